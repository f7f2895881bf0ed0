"""Model configuration: the few numbers that fix every tensor shape in the book.

Letters used for shapes everywhere in kvlib:
    B batch, T query tokens, S keys (cache length), L layers, H query heads,
    K kv heads, G = H // K group size, D head dim, C model dim, V vocab.

`ModelConfig` is frozen: a model, a cache and a memory estimate built from the same
config always agree. Published configurations live in one registry,
`kvlib.memory.MODELS`; this module holds only the small presets the tests and
chapters run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvlib.errors import ConfigError, KVLibTypeError, check_int


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype (fp32 -> 4, bf16 -> 2, int8 -> 1)."""
    if not isinstance(dtype, torch.dtype):
        raise KVLibTypeError(f"expected a torch.dtype such as torch.float16, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

    `head_dim` defaults to dim // n_heads and `ffn_dim` to the Llama rule
    (2/3 of 4*dim, rounded up to a multiple of 32) when left as None.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        # Fill the derived defaults first (frozen dataclass: go through object.__setattr__).
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            check_int(field, getattr(self, field), error=ConfigError)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                    "pass head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.ffn_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            object.__setattr__(self, "ffn_dim", 32 * ((hidden + 31) // 32))
        for field in ("head_dim", "ffn_dim"):
            check_int(field, getattr(self, field), error=ConfigError)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}: "
                "each kv head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE (pairs of channels)")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """G = H // K: query heads sharing one kv head (1 = MHA, H = MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        """'MHA', 'GQA' or 'MQA'."""
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    @property
    def kv_elements_per_token(self) -> int:
        """Numbers cached per token over all layers: 2 (K and V) * L * K * D."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of K and V a kvlib cache of this decoder holds per token: 2 * L * K * D numbers.

        This counts the per-head K and V rows a Llama-style decoder caches. A published model that
        caches something else (DeepSeek-V2's MLA latent) or a quantized or tensor-parallel cache is
        counted by `kvlib.memory.kv_bytes_per_token`, which knows the registry's extras.
        """
        return self.kv_elements_per_token * dtype_bytes(dtype)

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings, attention, MLP, norms, output head)."""
        c, d = self.dim, self.head_dim
        attn = c * self.n_heads * d + 2 * c * self.n_kv_heads * d + self.n_heads * d * c
        mlp = 3 * c * self.ffn_dim
        per_layer = attn + mlp + 2 * c
        head = 0 if self.tie_embeddings else self.vocab_size * c
        return self.vocab_size * c + self.n_layers * per_layer + c + head

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again).

        A field left to its default (head_dim = dim // n_heads, the Llama ffn_dim,
        n_kv_heads = n_heads) is derived again from the new fields unless it is given.
        """
        derived = {
            "head_dim": (("dim", "n_heads"), self.dim // self.n_heads),
            "ffn_dim": (("dim",), 32 * ((int(2 * 4 * self.dim / 3) + 31) // 32)),
            "n_kv_heads": (("n_heads",), self.n_heads),
        }
        for field, (sources, default) in derived.items():
            moved = any(name in changes for name in sources)
            if moved and field not in changes and getattr(self, field) == default:
                changes[field] = None  # derive it again from the new fields
        return dataclasses.replace(self, **changes)


def tiny(**overrides) -> ModelConfig:
    """A 2-layer GQA model small enough for every test to run in milliseconds."""
    fields = dict(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        name="tiny",
    )
    fields.update(overrides)
    return ModelConfig(**fields)
