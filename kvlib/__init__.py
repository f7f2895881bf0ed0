"""kvlib: the KV cache of a transformer decoder, built step by step.

The public names the chapters use are importable from here; every submodule is one concept
(see the module docstrings for the shapes each one uses).

Layers, lowest first. A module imports kvlib modules of lower layers only (tests/test_layers.py
checks every import, those inside functions too, so there is no cycle and no upward import):

    0  errors  engine  server
    1  config  data  figures  metrics  notebook  online_softmax  paged_kernel  plots  timing
    1  gpu  gpu.nvrtc
    1  quantize  engine.request  engine.radix  engine.trace  server.text  server.protocol
    2  attention  rope  registry  flops  serving  preemption  blocks  quant_scheme  quant_kernel
    2  gpu.kernels  engine.blocks
    3  cache  memory  paged_attention  quant_attention  gpu.host
    4  kv_cache  paged  quant_stream  eviction.base  roofline  gpu.roofline
    5  quant  eviction.policies  transformer  gpu.emulate  engine.kv
    6  paged_quant  eviction  generate  chunked  hf  pretrained  streaming  engine.scheduler
    7  kvlib  train  checkpoints  bench  bench.report  bench.gpu_timing  engine.core  export
    8  exercises  bench.problems  bench.section  bench.gpu_machine  bench.gpu_results
    8  engine.replay  server.loop  loadgen  vllm_check
    9  exercises.*  bench.*  server.app  serve_compare
   10  bench.cpu  bench.gpu  server.__main__
   11  bench.__main__

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
    E  bytes per slot of a quantized paged pool: a token's codes, then its scale and zero point
    W  tokens an eviction policy keeps (its window or budget)
    m, n, k  the dims of a matrix product (m, k) @ (k, n) -> (m, n), in the GPU kernels only
    b, h, t, s  a mask's dims, each 1 (broadcast) or the full B, H, T, S

A chunk of a prompt is T (the query tokens of that call); a whole stream of token ids is (B, S).
"""

from kvlib.cache import Cache
from kvlib.config import ConfigError, ModelConfig
from kvlib.errors import CacheFullError, KVCacheError, KVLibError
from kvlib.generate import generate
from kvlib.kv_cache import ConcatKVCache, KVCache
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
