"""Published models and GPUs: the one place their numbers live, each with its source.

`MODELS` holds published configurations as `ModelConfig`s; facts a `ModelConfig` cannot hold (MLA
widths, sliding window, parameter counts of non-Llama architectures) live in `EXTRAS`, keyed by the
same names. `GPUS` lists accelerators with memory, bandwidth and peak dense fp16/bf16 tensor
FLOP/s. Each entry cites its source (a key of book/references.bib) in `SOURCES` or its `source`.
`get_model` and `get_gpu` look names up case-insensitively and suggest close ones.

Units: bytes are bytes; GB = 1e9 bytes and GiB = 2**30 bytes; GPU datasheets write "80GB" for a
memory capacity that is 80 GiB (nvidia-smi lists an A100 80GB as 81920 MiB), while bandwidths in
GB/s and TB/s are decimal; `GPU` stores both in plain bytes and bytes/s. The formulas that use
these numbers are in `kvlib.memory`.

Usable memory: some GPUs show less than their label. GDDR memory with ECC on gives up 6.25% of
its capacity to the check bits (a T4 labelled 16 GB shows 15 GiB), and an H100 80GB shows
81559 MiB, not 81920. Where the memory the driver reports (nvidia-smi's total) differs from the
label, `GPU.memory_usable_bytes` holds it, with its source in `usable_source`; `GPU.usable()` is
the same GPU with that memory, for the capacity formulas of `kvlib.memory`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from kvlib.config import ModelConfig
from kvlib.errors import KVLibTypeError, UnknownNameError

KiB = 2**10
MiB = 2**20
GiB = 2**30
KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12


# ---- models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2): what one token caches in one layer."""

    kv_lora_rank: int  # d_c: width of the compressed latent c_kv, shared by all heads
    rope_head_dim: int  # d_r: the decoupled RoPE key, also shared by all heads

    @property
    def elements_per_token_per_layer(self) -> int:
        """d_c + d_r numbers per token per layer."""
        return self.kv_lora_rank + self.rope_head_dim


@dataclass(frozen=True)
class ModelExtras:
    """Facts about a published model that `ModelConfig` (a Llama-style decoder) lacks."""

    mla: MLA | None = None  # cache a latent instead of per-head K and V
    sliding_window: int | None = None  # every layer attends to (and caches) the last W tokens
    n_params: int | None = None  # when the Llama parameter formula does not apply
    note: str = ""


def gpt_n_params(vocab_size: int, dim: int, n_layers: int, ffn_dim: int, n_positions: int) -> int:
    """Parameters of a GPT-2/OPT-style decoder (learned positions, LayerNorm, biases, tied head).

    Per layer: QKV and output projections 4*C*C + 4*C biases, MLP 2*C*F + F + C,
    two LayerNorms 4*C; plus token and position embeddings and a final LayerNorm.
    """
    c, f = dim, ffn_dim
    per_layer = (4 * c * c + 4 * c) + (2 * c * f + f + c) + 4 * c
    return vocab_size * c + n_positions * c + n_layers * per_layer + 2 * c


# name -> published configuration; SOURCES[name] is the bibtex key of its source.
# GPT-2, OPT and DeepSeek-V2 are not Llama-style: their KV shapes are exact here, their
# parameter counts come from EXTRAS.
MODELS: dict[str, ModelConfig] = {
    # GPT-2 small (124M): the original MHA decoder, 12 heads of 64.
    "GPT-2": ModelConfig(
        vocab_size=50257,
        dim=768,
        n_layers=12,
        n_heads=12,
        ffn_dim=3072,
        max_seq_len=1024,
        tie_embeddings=True,
        name="GPT-2",
    ),
    # GPT-2 XL (1.5B): 25 heads of 64.
    "GPT-2-XL": ModelConfig(
        vocab_size=50257,
        dim=1600,
        n_layers=48,
        n_heads=25,
        ffn_dim=6400,
        max_seq_len=1024,
        tie_embeddings=True,
        name="GPT-2-XL",
    ),
    # The vLLM paper's worked example (section 3): 800 KB of KV cache per token.
    "OPT-13B": ModelConfig(
        vocab_size=50272,
        dim=5120,
        n_layers=40,
        n_heads=40,
        ffn_dim=20480,
        max_seq_len=2048,
        tie_embeddings=True,
        name="OPT-13B",
    ),
    "LLaMA-13B": ModelConfig(
        vocab_size=32000,
        dim=5120,
        n_layers=40,
        n_heads=40,
        ffn_dim=13824,
        max_seq_len=2048,
        norm_eps=1e-6,
        name="LLaMA-13B",
    ),
    "Llama-2-7B": ModelConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn_dim=11008,
        max_seq_len=4096,
        name="Llama-2-7B",
    ),
    "Llama-2-13B": ModelConfig(
        vocab_size=32000,
        dim=5120,
        n_layers=40,
        n_heads=40,
        ffn_dim=13824,
        max_seq_len=4096,
        name="Llama-2-13B",
    ),
    "Llama-2-70B": ModelConfig(
        vocab_size=32000,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        max_seq_len=4096,
        name="Llama-2-70B",
    ),
    "Llama-3-8B": ModelConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        name="Llama-3-8B",
    ),
    "Llama-3-70B": ModelConfig(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        max_seq_len=8192,
        rope_theta=500000.0,
        name="Llama-3-70B",
    ),
    # Mistral 7B v0.1: GQA and a 4096-token sliding window (EXTRAS).
    "Mistral-7B": ModelConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        name="Mistral-7B",
    ),
    # Qwen2.5-7B: 28 query heads share 4 kv heads (G = 7); 128K context (YaRN beyond 32K).
    # (Its q/k/v biases, 129,024 parameters, are left out of the parameter count.)
    "Qwen2.5-7B": ModelConfig(
        vocab_size=152064,
        dim=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        ffn_dim=18944,
        max_seq_len=131072,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        name="Qwen2.5-7B",
    ),
    "DeepSeek-LLM-67B": ModelConfig(
        vocab_size=102400,
        dim=8192,
        n_layers=95,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=22016,
        max_seq_len=4096,
        name="DeepSeek-LLM-67B",
    ),
    # DeepSeek-V2 (MoE, MLA). Written as its MHA equivalent: 128 heads of D = 128 (the value
    # and non-RoPE key width). What it really caches is the MLA latent in EXTRAS.
    "DeepSeek-V2": ModelConfig(
        vocab_size=102400,
        dim=5120,
        n_layers=60,
        n_heads=128,
        n_kv_heads=128,
        head_dim=128,
        ffn_dim=12288,
        max_seq_len=131072,
        norm_eps=1e-6,
        name="DeepSeek-V2",
    ),
}

EXTRAS: dict[str, ModelExtras] = {
    "GPT-2": ModelExtras(
        n_params=gpt_n_params(50257, 768, 12, 3072, 1024),
        note="GPT-2 small (124M): LayerNorm, GELU MLP, learned positions, tied head",
    ),
    "GPT-2-XL": ModelExtras(
        n_params=gpt_n_params(50257, 1600, 48, 6400, 1024),
        note="GPT-2 XL (1.5B): LayerNorm, GELU MLP, learned positions, tied head",
    ),
    "OPT-13B": ModelExtras(
        # OPT's learned position table has 2 extra rows (an offset of 2).
        n_params=gpt_n_params(50272, 5120, 40, 20480, 2048 + 2),
        note="LayerNorm, ReLU MLP, learned positions, tied head",
    ),
    "Mistral-7B": ModelExtras(sliding_window=4096, note="rolling buffer cache of 4096 tokens"),
    "DeepSeek-V2": ModelExtras(
        mla=MLA(kv_lora_rank=512, rope_head_dim=64),
        n_params=236 * 10**9,  # published total (21B active per token): MoE, 160 routed experts
        note="MLA: caches d_c + d_r = 576 numbers per token per layer; MoE weights",
    ),
}

SOURCES: dict[str, str] = {
    "GPT-2": "radford2019gpt2",
    "GPT-2-XL": "radford2019gpt2",
    "OPT-13B": "zhang2022opt",
    "LLaMA-13B": "touvron2023llama",
    "Llama-2-7B": "touvron2023llama2",
    "Llama-2-13B": "touvron2023llama2",
    "Llama-2-70B": "touvron2023llama2",
    "Llama-3-8B": "grattafiori2024llama3",
    "Llama-3-70B": "grattafiori2024llama3",
    "Mistral-7B": "jiang2023mistral",
    "Qwen2.5-7B": "qwen2024qwen25",
    "DeepSeek-LLM-67B": "deepseek2024llm",
    "DeepSeek-V2": "deepseek2024v2",
}


# ---- GPUs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """An accelerator as its datasheet describes it (dense numbers, no sparsity)."""

    name: str
    memory_bytes: int  # capacity in bytes (datasheet "GB" read as GiB, see module docstring)
    memory_published: str  # the datasheet's own words
    bandwidth: float  # memory bandwidth, bytes/s (decimal GB/s, TB/s)
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s (fp32 accumulate), no sparsity
    bf16: bool  # whether the tensor cores take bf16 (T4 and V100: fp16 only)
    source: str  # bibtex key of the datasheet
    note: str = ""
    memory_usable_bytes: int | None = None  # what the driver reports, where less than the label
    usable_source: str = ""  # bibtex key of memory_usable_bytes

    @property
    def usable_bytes(self) -> int:
        """The memory a program can use: the reported figure if recorded, else the label's."""
        return self.memory_bytes if self.memory_usable_bytes is None else self.memory_usable_bytes

    def usable(self) -> GPU:
        """This GPU with `memory_bytes` set to the usable memory (itself if nothing is recorded)."""
        if self.memory_usable_bytes is None:
            return self
        return replace(self, memory_bytes=self.memory_usable_bytes, memory_usable_bytes=None)


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("T4", 16 * GiB, "16 GB GDDR6", 320 * GB, 65 * TB, False, "nvidia2019t4",
            "Colab's free GPU; ECC on (as in clouds) leaves 15 GiB",
            memory_usable_bytes=15360 * MiB, usable_source="modal2025gpumemory"),
        GPU("L4", 24 * GiB, "24 GB GDDR6", 300 * GB, 121 * TB, True, "nvidia2023l4",
            "datasheet lists 242 TFLOPS with sparsity; ECC on",
            memory_usable_bytes=23034 * MiB, usable_source="modal2025gpumemory"),
        GPU("A10", 24 * GiB, "24 GB GDDR6", 600 * GB, 125 * TB, True, "nvidia2021a10",
            "datasheet lists 250 TFLOPS with sparsity; ECC on",
            memory_usable_bytes=23028 * MiB, usable_source="modal2025gpumemory"),
        GPU("V100-32", 32 * GiB, "32 GB HBM2", 900 * GB, 125 * TB, False, "nvidia2020v100",
            "SXM2"),
        GPU("A100-40", 40 * GiB, "40 GB HBM2", 1555 * GB, 312 * TB, True, "nvidia2021a100",
            "SXM; datasheet lists 624 TFLOPS with sparsity"),
        GPU("A100-80", 80 * GiB, "80 GB HBM2e", 2039 * GB, 312 * TB, True, "nvidia2021a100",
            "SXM; datasheet lists 624 TFLOPS with sparsity"),
        GPU("H100-80", 80 * GiB, "80 GB HBM3", 3.35 * TB, 989.5 * TB, True, "nvidia2023h100",
            "SXM; datasheet lists 1,979 TFLOPS with sparsity",
            memory_usable_bytes=81559 * MiB, usable_source="modal2025gpumemory"),
        GPU("H200-141", 141 * GiB, "141 GB HBM3e", 4.8 * TB, 989.5 * TB, True, "nvidia2024h200",
            "SXM; datasheet lists 1,979 TFLOPS with sparsity"),
        GPU("MI300X", 192 * GiB, "192 GB HBM3", 5.3 * TB, 1307.4 * TB, True, "amd2023mi300x",
            "AMD; datasheet lists 2,614.9 TFLOPS with sparsity"),
    )
}  # fmt: skip


# ---- lookups -----------------------------------------------------------------------------


def _lookup(kind: str, name: str, registry: dict):
    if not isinstance(name, str):
        raise KVLibTypeError(f"a {kind} name must be a str, got {type(name).__name__}")
    if name in registry:
        return registry[name]
    by_lower = {k.lower(): k for k in registry}
    if name.lower() in by_lower:
        return registry[by_lower[name.lower()]]
    close = difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise UnknownNameError(f"unknown {kind} {name!r}{hint} (known: {', '.join(registry)})")


def get_model(name: str) -> ModelConfig:
    """The registered configuration `name` (case-insensitive); unknown names suggest close ones."""
    return _lookup("model", name, MODELS)


def get_gpu(name: str) -> GPU:
    """The registered GPU `name` (case-insensitive); unknown names suggest close ones."""
    return _lookup("GPU", name, GPUS)


def as_config(model: ModelConfig | str) -> ModelConfig:
    if isinstance(model, str):
        return get_model(model)
    if not isinstance(model, ModelConfig):
        raise KVLibTypeError(f"expected a ModelConfig or a model name, got {type(model).__name__}")
    return model


def as_gpu(gpu: GPU | str) -> GPU:
    if isinstance(gpu, str):
        return get_gpu(gpu)
    if not isinstance(gpu, GPU):
        raise KVLibTypeError(f"expected a GPU or a GPU name, got {type(gpu).__name__}")
    return gpu


def extras(model: ModelConfig | str) -> ModelExtras:
    """The registered extras of a published model; empty for any other config.

    A config counts as published only if it equals MODELS[config.name], so a modified copy
    (say `replace(n_kv_heads=...)`) is treated as the plain Llama-style decoder it describes.
    """
    config = as_config(model)
    if MODELS.get(config.name) == config:
        return EXTRAS.get(config.name, ModelExtras())
    return ModelExtras()


def attention_kind(model: ModelConfig | str) -> str:
    """'MHA', 'GQA', 'MQA' or 'MLA' (a published model that caches a latent)."""
    config = as_config(model)
    return "MLA" if extras(config).mla is not None else config.attention_kind
