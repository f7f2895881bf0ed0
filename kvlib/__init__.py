"""kvlib: the KV cache of a transformer decoder, built step by step.

The public names the chapters use are importable from here; every submodule is one concept
(see the module docstrings for the shapes each one uses).
"""

from kvlib.cache import Cache, CacheFullError, ConcatKVCache, KVCache, KVCacheError
from kvlib.config import ConfigError, ModelConfig
from kvlib.generate import generate
from kvlib.pretrained import load_pretrained
from kvlib.transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CacheFullError",
    "ConcatKVCache",
    "ConfigError",
    "KVCache",
    "KVCacheError",
    "ModelConfig",
    "Transformer",
    "generate",
    "load_pretrained",
]
