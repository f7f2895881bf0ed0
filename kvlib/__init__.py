"""kvlib: the KV cache of a transformer decoder, built step by step.

The public names the chapters use are importable from here; every submodule is one concept
(see the module docstrings for the shapes each one uses).

Layers, lowest first. A module imports kvlib modules of lower layers only (tests/test_layers.py
checks every import, those inside functions too, so there is no cycle and no upward import):

    0  config  data  metrics  notebook  paged_kernel  timing  gpu  gpu.nvrtc
    1  attention  rope  memory  flops  serving  gpu.kernels
    2  cache  gpu.roofline
    3  paged  quant  eviction
    4  transformer  gpu.emulate
    5  generate  chunked  hf  pretrained
    6  kvlib  train  gpu.bench
    7  bench  exercises
    8  exercises.*

The cache interface (`kvlib.cache.Cache`) sits above the attention math because its default
`attend` runs the grouped attention; every cache sits below the model, which only calls the
interface.
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
