"""kvlib: the KV cache of a transformer decoder, built step by step.

The public names the chapters use are importable from here; every submodule is one concept
(see the module docstrings for the shapes each one uses).

Layers, lowest first. A module imports kvlib modules of lower layers only (tests/test_layers.py
checks every import, those inside functions too, so there is no cycle and no upward import):

    0  errors
    1  config  data  metrics  notebook  paged_kernel  timing  gpu  gpu.nvrtc  quantize
    2  attention  rope  memory  flops  serving  gpu.kernels  roofline  quant_scheme  quant_kernel
    3  cache  gpu.roofline  quant_attention
    4  paged  quant  eviction
    5  transformer  gpu.emulate  paged_quant
    6  generate  chunked  hf  pretrained
    7  kvlib  train  gpu.bench
    8  bench  exercises  bench_quant
    9  exercises.*

The cache interface (`kvlib.cache.Cache`) sits above the attention math because its default
`attend` runs the grouped attention; every cache sits below the model, which only calls the
interface.

Shape letters, one meaning each, used in every shape comment:

    B  batch (sequences)            L  layers                 V  vocabulary size
    T  query tokens in this call    H  query heads            C  model dim (H * D)
    S  keys: cached tokens          K  key/value heads        F  MLP hidden dim
    D  head dim                     G  query heads per kv head (H // K)
    N  blocks in a paged pool       P  tokens per block       M  blocks per sequence (table width)
    R  residual tokens a quantized cache keeps in full precision
    W  tokens an eviction policy keeps (its window or budget)
    m, n, k  the dims of a matrix product (m, k) @ (k, n) -> (m, n), in the GPU kernels only

A chunk of a prompt is T (the query tokens of that call); a whole stream of token ids is (B, S).
"""

from kvlib.cache import Cache, CacheFullError, ConcatKVCache, KVCache, KVCacheError
from kvlib.config import ConfigError, ModelConfig
from kvlib.errors import KVLibError
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
    "KVLibError",
    "ModelConfig",
    "Transformer",
    "generate",
    "load_pretrained",
]
