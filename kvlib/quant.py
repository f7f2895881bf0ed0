"""The quantized KV cache: keys and values stored as codes and scales, read by a fused pass.

`QuantizedKVCache` implements the cache interface of `kvlib.cache` on top of the quantizers
of `kvlib.quantize`: it quantizes keys and values as they are appended. Its `QuantScheme`
picks the bits and granularity of keys and values and a full-precision residual of R tokens.
KIVI (Liu et al. 2024) quantizes keys per channel and values per token: a key scale needs a
group of tokens, so keys wait in full precision until R of them have arrived and are then
quantized per channel as one block, while values keep the R most recent tokens in full
precision and quantize each older token per token. FP8 schemes fix their per-tensor or
per-head scale at a layer's first write (the prompt), as vLLM does when it computes the scales
from the first batch, with FP8_HEADROOM for larger numbers later; beyond it they saturate.

Two ways to read it:

    attend(layer, q, k, v, mask)   the model's call: store k, v, then the fused read of
                                   `kvlib.quant_attention` (codes dequantized one chunk at a
                                   time, the residual in the same pass; no fp32 history)
    update(layer, k, v)            store, then return the whole (B, K, S, D) history
                                   dequantized (the reference path; chapter 6 looks at it)

Padding slots are stored as zeros so they never widen a scale.
"""

from __future__ import annotations

import torch

from kvlib.cache import Cache
from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, KVLibTypeError, check_int
from kvlib.quant_attention import DEFAULT_CHUNK, chunk_bounds, chunked_attention
from kvlib.quant_kernel import quant_decode_attention
from kvlib.quant_scheme import (  # noqa: F401  (re-exported: the names chapters and tests import)
    SCHEMES,
    QuantScheme,
    fp8,
    kivi,
    n_quantized,
    quantize_stream,
)
from kvlib.quant_stream import QuantStream
from kvlib.quantize import (  # noqa: F401  (re-exported)
    BITS,
    FP8_GRANULARITIES,
    FP8_HEADROOM,
    FP8_IN_HALF,
    GRANULARITIES,
    INPUT_DTYPES,
    Granularity,
    QuantizedTensor,
    dequantize,
    fp8_as_half,
    fp8_scale,
    fp8_to_float,
    pack,
    quantize,
    quantize_fp8,
    roundtrip,
    unpack,
)

# ---- the cache ---------------------------------------------------------------------------------


def _is_valid_mask(mask: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether a decode step's mask (broadcastable to (B, 1, 1, S)) is the valid-slot mask."""
    B, S = valid.shape
    return (
        mask.shape[-1] == S
        and mask.numel() in (S, B * S)
        and torch.equal(mask.reshape(-1, S).expand(B, S), valid)
    )


class QuantizedKVCache(Cache):
    """A KV cache that stores keys and values quantized by a `QuantScheme`.

    Same interface as `kvlib.KVCache`: `update(layer, k, v)` quantizes the new tokens (those
    leaving the full-precision residual) and returns the whole history dequantized, (B, K, S, D)
    in the cache's `dtype`. Padding slots are stored as zeros so they never widen a scale.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        scheme: QuantScheme | str = "int8 per-token",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, dtype, device)
        check_int("max_seq_len", max_seq_len, error=KVCacheError)
        if isinstance(scheme, str):
            if scheme not in SCHEMES:
                raise KVCacheError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
            scheme = SCHEMES[scheme]
        if not isinstance(scheme, QuantScheme):
            raise KVLibTypeError(
                f"scheme must be a QuantScheme or a name, got {type(scheme).__name__}"
            )
        if dtype not in INPUT_DTYPES:
            raise KVCacheError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        D = head_dim
        if D * scheme.bits % 8:
            raise KVCacheError(
                f"head_dim={D} at {scheme.bits} bits does not fill whole bytes: it must be a "
                f"multiple of {8 // scheme.bits}"
            )
        if "group" in (scheme.key, scheme.value) and D % scheme.group_size:
            raise KVCacheError(
                f"group_size={scheme.group_size} does not divide head_dim={D}: pick a divisor"
            )
        if "channel" in (scheme.key, scheme.value) and max_seq_len % scheme.residual:
            raise KVCacheError(
                f"max_seq_len={max_seq_len} must be a multiple of residual={scheme.residual}: "
                "per-channel blocks of R tokens tile the cache"
            )
        self.max_seq_len = max_seq_len
        self.scheme = scheme
        self.chunk_size = DEFAULT_CHUNK  # tokens the fused read dequantizes at a time
        self.use_kernel = True  # decode steps run kvlib.quant_kernel where it applies
        args = (batch_size, n_kv_heads, max_seq_len, D, dtype, self.device)
        self.keys = [QuantStream(scheme, scheme.key, *args) for _ in range(n_layers)]
        self.values = [QuantStream(scheme, scheme.value, *args) for _ in range(n_layers)]

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        scheme: QuantScheme | str = "int8 per-token",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> QuantizedKVCache:
        """A cache shaped for `config` (capacity defaults to config.max_seq_len)."""
        return cls(
            config.n_layers,
            batch_size,
            config.n_kv_heads,
            config.head_dim,
            config.max_seq_len if max_seq_len is None else max_seq_len,
            scheme,
            dtype=dtype,
            device=device,
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return its (B, K, S, D) dequantized history."""
        S = self._store(layer, k, v)
        return self.keys[layer].read(S, self.dtype), self.values[layer].read(S, self.dtype)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Store k, v (B, K, T, D); return q's (B, H, T, D) attention over the history, read by
        the fused pass (`kvlib.quant_attention.chunked_attention`): codes are dequantized one
        chunk at a time, never into a whole fp32 history."""
        self._check_q(q, k)
        S = self._store(layer, k.to(self.dtype), v.to(self.dtype))
        ks, vs = self.keys[layer], self.values[layer]
        if self.kernel_reads(q, mask, S):  # the compiled loop of kvlib.quant_kernel
            B = self.batch_size
            tables = torch.arange(B)[:, None]  # (B, 1): row b is "block" b of its stream
            lens = S - self._start  # (B,) real tokens, from slot start[b] on
            coded = (ks.coded(), vs.coded())
            args = (tables, self._start, self._start, lens, self.scheme.fp8)
            return quant_decode_attention(q, *coded, *args)
        return chunked_attention(q, ks.read_chunk, vs.read_chunk, self.chunk_edges(layer, S), mask)

    def kernel_reads(self, q: torch.Tensor, mask: torch.Tensor | None, S: int) -> bool:
        """Whether `attend` runs the compiled loop: a decode step (T = 1) on the CPU, int8 per
        token or FP8 codes, no residual, and no mask but which slots hold tokens."""
        s = self.scheme
        per_token_int8 = s.bits == 8 and s.key == s.value == "token"
        return (
            self.use_kernel
            and self.device.type == "cpu"
            and not q.requires_grad  # the compiled loop computes no gradients
            and q.shape[2] == 1
            and s.residual == 0
            and (s.fp8 or per_token_int8)
            and (mask is None or _is_valid_mask(mask, self.valid_mask(S)))
        )

    def chunk_edges(self, layer: int, S: int) -> list[int]:
        """Where the fused read of `layer`'s S slots cuts chunks: every `chunk_size` tokens
        (whole per-channel blocks) and where codes end and the residual begins."""
        ks, vs = self.keys[layer], self.values[layer]
        align = self.scheme.residual if "channel" in (self.scheme.key, self.scheme.value) else 1
        return chunk_bounds(S, self.chunk_size, (ks.n_q, vs.n_q), align)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Quantize and store k, v (B, K, T, D); return the layer's new length."""
        T = self._check_kv(layer, k, v, self.max_seq_len)
        pos = self._len[layer]
        slots = torch.arange(pos, pos + T, device=self.device)  # (T,)
        pad = (slots[None, :] < self._start[:, None])[:, None, :, None]  # (B, 1, T, 1)
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        ks, vs = self.keys[layer], self.values[layer]
        k_plan, v_plan = ks.plan(pos, k), vs.plan(pos, v)  # may raise: nothing written yet
        ks.commit(*k_plan)
        vs.commit(*v_plan)
        self._len[layer] = pos + T
        self.elements_copied += k.numel() + v.numel()
        return pos + T

    @property
    def capacity(self) -> int:
        return self.max_seq_len

    def checkpoint(self) -> dict:
        """Lengths, and per stream the quantized count and a copy of the small residual (the
        only storage a step rewrites; codes and scales are written past the quantized count)."""
        streams = [(st.n_q, st.resid.clone(), st.scale) for st in self.keys + self.values]
        return super().checkpoint() | {"streams": streams}

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        for st, (n_q, resid, scale) in zip(self.keys + self.values, state["streams"], strict=True):
            st.n_q = n_q
            st.resid.copy_(resid)
            if st.fp8:
                st.scale = scale

    def crop(self, n: int) -> None:
        """Keep the first n slots of every layer (see `QuantStream.crop` for per-channel blocks)."""
        before = list(self._len)
        super().crop(n)  # validates n
        for layer, length in enumerate(before):
            self.keys[layer].crop(length, n, self.dtype)
            self.values[layer].crop(length, n, self.dtype)

    def reset(self) -> None:
        super().reset()
        for stream in self.keys + self.values:
            stream.n_q = 0
            if stream.fp8:
                stream.scale = None

    def n_full_precision(self, layer: int = 0) -> tuple[int, int]:
        """(keys, values) of `layer` currently held in full precision."""
        self._check_layer(layer)
        length = self._len[layer]
        return length - self.keys[layer].n_q, length - self.values[layer].n_q

    @property
    def nbytes_allocated(self) -> int:
        """Bytes reserved: codes, scales, zero points and residual buffers of every layer."""
        return sum(
            t.numel() * t.element_size() for s in self.keys + self.values for t in s.tensors()
        )

    @property
    def nbytes_used(self) -> int:
        """Bytes holding real tokens: their codes, the scales and zero points of every group
        that holds one of them, and the residual tokens (padding slots excluded)."""
        total = 0
        D, K = self.head_dim, self.n_kv_heads
        for layer in range(self.n_layers):
            length = self._len[layer]
            for start in self._start.tolist():
                for stream in (self.keys[layer], self.values[layer]):
                    total += K * stream.nbytes(min(start, length), length, D, self.dtype)
        return total

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(L={self.n_layers}, B={self.batch_size}, K={self.n_kv_heads}, "
            f"S_max={self.max_seq_len}, D={self.head_dim}, {self.scheme.label()}, "
            f"dtype={self.dtype}, seq_len={self.seq_len})"
        )
