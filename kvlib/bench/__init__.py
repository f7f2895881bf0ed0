"""Every optimization in kvlib measured side by side: `python -m kvlib.bench`.

Importing this package loads nothing: each module is imported when it is used.

The CPU bench (`python -m kvlib.bench [--quick] [--sections ...]`), one section per module:

    generation   cached vs uncached greedy generation, tokens/s vs tokens generated
    huggingface  section "hf": kvlib `generate` vs Hugging Face `generate` on the same
                 random-init Llama (weights copied with `kvlib.hf.from_hf_llama`), identical
                 tokens checked; `hf_fields` builds the LlamaConfig fields of a kvlib config
    paged        decode attention: contiguous `attention` vs `paged_attention` (gather, blocks,
                 grouped blocks, the fused kernel)
    bandwidth    decode attention's K/V bytes read per second vs a large tensor copy
    memory       bytes per token and sequences that fit a memory budget, per cache strategy,
                 from the cache objects' own `nbytes_allocated` / `nbytes_used`
    pretrained   the shipped model (`kvlib.load_pretrained`) decoding with each cache (if shipped)
    cpu          the registry of sections (`SECTIONS`), `run`, `format_report`, `validate_result`

The GPU bench (`python -m kvlib.bench --gpu`, chapter 10's CUDA kernels):

    gpu_timing   CUDA-event timing with L2 flushed between calls; the GPU copy bandwidth
    gpu_machine  is there a usable GPU (`require_gpu`), its datasheet entry (`match_gpu`)
    gpu_gemm     fp16 GEMM, kvlib's kernels vs cuBLAS
    gpu_decode   paged decode attention bandwidth vs torch SDPA, S = 1k to 64k
    gpu_results  the committed results in kvlib/gpu/results/: load, validate, summarize
    gpu          `run_gpu`, `format_gpu`, `targets`

Shared by both:

    report       targets (PASS / MISS), report formatting, machine info, versions, results as
                 JSON (write, load, validate)
    problems     the measured problems: a decode step, the same K/V in shuffled blocks, the
                 fp32 decode reference, the model configs
    section      what a section module provides (`run`, `format`) and the run's `Settings`
    __main__     the command line

The timing itself is `kvlib.timing` (the chapters use it too): every contender runs once to
warm up, then the contenders take turns (interleaved repetitions, the order rotated each round)
and the median wins, so a busy machine slows all sides alike. Each figure has a target,
printed PASS or MISS. Tensor layout of the attention inputs, as everywhere in kvlib:
q (B, H, T, D), k, v (B, K, S, D), pool (N, K, P, D).

Adding a section. A section is a module in this package with

    def run(quick: bool) -> dict            # or run(quick: bool, settings: Settings) -> dict
    def format(figure: dict) -> list[str]   # optional: report lines (else default_format)

whose figure carries its targets (dicts made by `kvlib.bench.report.target`) in a "targets"
list, or as rows of its "rows" list. Register it with one line in `cpu.SECTIONS`, e.g.

    "quantized": "kvlib.bench.quantized",

and `python -m kvlib.bench --sections quantized` runs it; a full run includes it. Its `target`
comes from `kvlib.bench.report` (no longer from `kvlib.timing`), and its layer is that of
`bench.*` in the table of `kvlib/__init__.py` (it may import `report`, `problems`, `section`
and anything below them).
"""
