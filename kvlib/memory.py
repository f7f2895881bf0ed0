"""KV cache memory: bytes per token, the registry of published model configurations.

`MODELS` is the one place published configurations live (chapter 9 extends it); each entry
cites its source in book/references.bib. Units: bytes are bytes; GB = 1e9 bytes,
GiB = 2**30 bytes, and every function says which it returns.
"""

from __future__ import annotations

import difflib

import torch

from kvlib.config import ModelConfig

# name -> published configuration; SOURCES[name] is the bibtex key of its source
MODELS: dict[str, ModelConfig] = {
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
}

SOURCES: dict[str, str] = {
    "Llama-2-7B": "touvron2023llama2",
    "Llama-3-8B": "grattafiori2024llama3",
}


def get_model(name: str) -> ModelConfig:
    """The registered configuration `name`; an unknown name suggests the closest ones."""
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown model {name!r}{hint} (known: {', '.join(MODELS)})")


def kv_bytes_per_token(config: ModelConfig | str, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of K and V per token over all layers: 2 * L * K * D * bytes(dtype)."""
    if isinstance(config, str):
        config = get_model(config)
    return config.kv_bytes_per_token(dtype)
