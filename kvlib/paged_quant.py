"""A paged and quantized KV cache: pool blocks that hold codes plus their scales.

`kvlib.paged` stores every token's keys and values in fixed-size blocks of a shared pool;
`kvlib.quant` stores them as codes and scales. Here the two combine, as vLLM's FP8 KV cache
does: the pool's blocks hold codes, and the scales travel with them, so fork, copy-on-write,
swap and preemption, which move whole blocks, move the scales too. One slot of a block holds,
for each kv head, E bytes:

    int schemes ('token' or 'group'):  D * bits / 8 bytes of codes, then the token's fp32
                                       scales (D / g of them), then its fp32 zero points
                                       (asymmetric schemes): E = D * bits / 8 + 4 * (D / g) [* 2]
    FP8 ('tensor' or 'head'):          D bytes of e4m3 codes; the scale is one per layer and
                                       stream (per kv head for 'head'), fixed at the pool's
                                       first write, as vLLM fixes its k_scale and v_scale

    allocator.k_pool[layer], allocator.v_pool[layer]: uint8 (N, K, P, E)

A scale that needs tokens of the future (per-channel keys, KIVI) or a full-precision window
(residual R > 0) does not fit a block that is shared and swapped as a unit, so those schemes
are refused here.

`PagedQuantKVCache` is a `PagedKVCache` whose `_store` and `_load` encode and decode those
bytes, so `update` (the gather reference path) returns the dequantized history, and whose
`attend` runs the fused read of `kvlib.quant_attention` on chunks gathered from the blocks:
codes are converted, never dequantized into a whole fp32 history.
"""

from __future__ import annotations

import torch

from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, KVLibTypeError
from kvlib.paged import BlockAllocator, PagedKVCache
from kvlib.quant import SCHEMES, _is_valid_mask
from kvlib.quant_attention import DEFAULT_CHUNK, Chunk, chunk_bounds, chunked_attention
from kvlib.quant_kernel import quant_decode_attention
from kvlib.quant_scheme import QuantScheme
from kvlib.quantize import (
    FP8_HEADROOM,
    FP8_IN_HALF,
    FP8_MAX,
    QuantizedTensor,
    dequantize,
    fp8_as_half,
    quantize,
    quantize_fp8,
    unpack,
)


def _scheme(scheme: QuantScheme | str) -> QuantScheme:
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise KVCacheError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
        scheme = SCHEMES[scheme]
    if not isinstance(scheme, QuantScheme):
        raise KVLibTypeError(f"scheme must be a QuantScheme or a name, got {type(scheme).__name__}")
    if scheme.residual or "channel" in (scheme.key, scheme.value):
        raise KVCacheError(
            f"{scheme.label()}: a paged pool stores each token on its own, so per-channel scales "
            "and a full-precision residual (KIVI) do not fit; use a per-token, per-group or FP8 "
            "scheme with residual=0"
        )
    return scheme


class QuantBlockAllocator(BlockAllocator):
    """A `BlockAllocator` whose pools hold codes and scales: uint8 (N, K, P, E) per layer."""

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        scheme: QuantScheme | str = "int8 per-token",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        scheme = _scheme(scheme)
        D = head_dim
        if D * scheme.bits % 8 or ("group" in (scheme.key, scheme.value) and D % scheme.group_size):
            raise KVCacheError(f"head_dim={head_dim} does not fit {scheme.label()}")
        # the parent validates the sizes and makes float pools of one channel, replaced here
        super().__init__(
            n_layers, num_blocks, block_size, n_kv_heads, 1, dtype=dtype, device=device
        )
        self.head_dim = D
        self.scheme = scheme
        self.code_bytes = D if scheme.fp8 else D * scheme.bits // 8
        groups = 0 if scheme.fp8 else D // (scheme.group_size or D)  # fp32 scales per token
        self.scale_bytes = 4 * groups * (1 if scheme.symmetric else 2)
        E = self.code_bytes + self.scale_bytes
        shape = (num_blocks, n_kv_heads, block_size, E)  # (N, K, P, E)
        self.k_pool = [
            torch.zeros(shape, dtype=torch.uint8, device=self.device) for _ in range(n_layers)
        ]
        self.v_pool = [
            torch.zeros(shape, dtype=torch.uint8, device=self.device) for _ in range(n_layers)
        ]

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        scheme: QuantScheme | str = "int8 per-token",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> QuantBlockAllocator:
        """A pool shaped for `config`'s layers, kv heads and head dim."""
        return cls(
            config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim,
            scheme, dtype=dtype, device=device,
        )  # fmt: skip

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, K and V: codes plus scales."""
        E = self.k_pool[0].shape[-1]
        return 2 * self.n_layers * self.n_kv_heads * self.block_size * E

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", {self.scheme.label()})"


class PagedQuantKVCache(PagedKVCache):
    """A `PagedKVCache` on a `QuantBlockAllocator`: quantized blocks, fused decode reads."""

    def __init__(self, allocator: QuantBlockAllocator, batch_size: int = 1) -> None:
        if not isinstance(allocator, QuantBlockAllocator):
            raise KVLibTypeError(
                f"allocator must be a QuantBlockAllocator, got {type(allocator).__name__}"
            )
        self.scheme = allocator.scheme
        # FP8: per layer, the fp32 scale of keys and of values, None until the first write
        self.fp8_scales: list[list[torch.Tensor | None]] = [
            [None, None] for _ in range(allocator.n_layers)
        ]
        self.chunk_size = DEFAULT_CHUNK  # tokens the fused read gathers at a time
        self.use_kernel = True  # decode steps run kvlib.quant_kernel where it applies
        super().__init__(allocator, batch_size)

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        *,
        num_blocks: int,
        block_size: int = 16,
        scheme: QuantScheme | str = "int8 per-token",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedQuantKVCache:
        """A cache with its own quantized pool of `num_blocks` blocks shaped for `config`."""
        pool = QuantBlockAllocator.from_config(
            config, num_blocks, block_size, scheme, dtype=dtype, device=device
        )
        return cls(pool, batch_size)

    @property
    def fused_decode(self) -> bool:
        """False: the compiled float kernel of `kvlib.paged_kernel` cannot read codes; `attend`
        runs the chunked fused read instead."""
        return False

    # ---- bytes in, bytes out ---------------------------------------------------------------
    def _encode(self, layer: int, stream: int, x: torch.Tensor) -> torch.Tensor:
        """x (n, K, D) -> uint8 (n, K, E): codes, then scales and zero points as fp32 bytes."""
        s = self.scheme
        if s.fp8:
            scale = self.fp8_scales[layer][stream]
            if scale is None:  # the first write fixes the scale: max |x| maps to FP8_MAX
                dims = (0, 2) if s.key == "head" else (0, 1, 2)
                amax = x.float().abs().amax(dim=dims).reshape(1, -1, 1, 1)  # (1, K or 1, 1, 1)
                scale = (amax / FP8_MAX).clamp(min=1e-30) * FP8_HEADROOM
                self.fp8_scales[layer][stream] = scale
            return quantize_fp8(x, s.key, scale.reshape(-1, 1)).data  # (n, K, D)
        gran = s.key  # 'token' or 'group', the same for keys and values here
        qt = quantize(x, s.bits, granularity=gran, group_size=s.group_size, symmetric=s.symmetric)
        parts = [qt.data, qt.scale.contiguous().view(torch.uint8)]  # (n, K, Dc), (n, K, 4*D/g)
        if qt.zero is not None:
            parts.append(qt.zero.contiguous().view(torch.uint8))
        return torch.cat(parts, dim=-1)  # (n, K, E)

    def _split(self, data: torch.Tensor):
        """uint8 (..., E) -> codes (..., Dc), fp32 scales (..., D/g), zero points or None."""
        a = self.allocator
        codes = data[..., : a.code_bytes]
        rest = data[..., a.code_bytes :].contiguous()
        if self.scheme.symmetric:
            return codes, rest.view(torch.float32), None
        half = rest.shape[-1] // 2
        return codes, rest[..., :half].view(torch.float32), rest[..., half:].view(torch.float32)

    def _decode(self, layer: int, stream: int, data: torch.Tensor) -> torch.Tensor:
        """uint8 (..., K, E) -> fp32 (..., K, D) numbers (the pool's slot layout)."""
        if self.scheme.fp8:
            if self.fp8_scales[layer][stream] is None:  # nothing stored yet: padding reads as 0
                return torch.zeros(*data.shape[:-1], self.head_dim)  # (..., K, D)
            scale = self.fp8_scales[layer][stream].reshape(-1, 1)  # (K or 1, 1)
            return fp8_as_half(data).float() * (scale / FP8_IN_HALF)  # (..., K, D)
        codes, scale, zero = self._split(data)
        s = self.scheme
        qt = QuantizedTensor(codes, scale, zero, s.bits, s.key, s.group_size,
                             (*codes.shape[:-1], self.head_dim), torch.float32)  # fmt: skip
        return dequantize(qt)

    def _store(self, layer, blk, off, k, v) -> None:
        """Encode k, v (n, K, D) and write their bytes to slots off of blocks blk."""
        self.allocator.k_pool[layer][blk, :, off] = self._encode(layer, 0, k)
        self.allocator.v_pool[layer][blk, :, off] = self._encode(layer, 1, v)

    def _load(self, layer, blk, off) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded k, v (..., K, D) in the cache dtype of slots off of blocks blk."""
        k = self._decode(layer, 0, self.allocator.k_pool[layer][blk, :, off])
        v = self._decode(layer, 1, self.allocator.v_pool[layer][blk, :, off])
        return k.to(self.dtype), v.to(self.dtype)

    # ---- the fused read --------------------------------------------------------------------
    def attend(self, layer, q, k, v, mask) -> torch.Tensor:
        """Store k, v (B, K, T, D); return q's (B, H, T, D) attention over each row's tokens,
        read in chunks gathered from the blocks (`kvlib.quant_attention.chunked_attention`)."""
        self._check_q(q, k)
        self._write(layer, k.to(self.dtype), v.to(self.dtype))
        S = self._len[layer]
        tables = self.block_tables().clamp(min=0)  # (B, M)
        if self.kernel_reads(q, mask, S):  # the compiled loop of kvlib.quant_kernel
            lens = torch.tensor([self._seqs[i].lens[layer] for i in self._active])  # (B,)
            first = torch.zeros_like(lens)  # a sequence's tokens start at its first block
            coded = (self._coded(layer, 0), self._coded(layer, 1))
            args = (tables, first, self._start, lens, self.scheme.fp8)
            return quant_decode_attention(q, *coded, *args)
        P, Kh = self.block_size, self.n_kv_heads
        heads = torch.arange(Kh, device=self.device)[None, :, None]  # (1, K, 1)

        def reader(stream: int):
            pool = (self.allocator.k_pool, self.allocator.v_pool)[stream][layer]  # (N, K, P, E)
            flat = pool.view(-1, pool.shape[-1])  # (N * K * P, E)

            def read(a: int, b: int) -> Chunk:
                r = torch.arange(a, b, device=self.device)[None, :] - self._start[:, None]  # (B, n)
                valid = r >= 0  # (B, n) padding slots read as zeros
                r = r.clamp(min=0)
                blk = tables.gather(1, (r // P).clamp(max=tables.shape[1] - 1))  # (B, n)
                # row (blk, k, off) of the pool seen as (N * K * P, E): one E-byte copy per slot
                rows = (blk[:, None, :] * Kh + heads) * P + (r % P)[:, None, :]  # (B, K, n)
                data = flat.index_select(0, rows.flatten()).view(*rows.shape, -1)  # (B, K, n, E)
                return self._chunk(layer, stream, data, valid[:, None, :, None])

            return read

        edges = chunk_bounds(S, self.chunk_size)
        return chunked_attention(q, reader(0), reader(1), edges, mask)

    def kernel_reads(self, q: torch.Tensor, mask: torch.Tensor | None, S: int) -> bool:
        """Whether `attend` runs the compiled loop: a decode step (T = 1) on the CPU, int8 per
        token or FP8 codes, and no mask but which slots hold tokens."""
        s = self.scheme
        return (
            self.use_kernel
            and self.device.type == "cpu"
            and not q.requires_grad  # the compiled loop computes no gradients
            and q.shape[2] == 1
            and (s.fp8 or (s.bits == 8 and s.key == "token"))
            and (mask is None or _is_valid_mask(mask, self.valid_mask(S)))
        )

    def _coded(
        self, layer: int, stream: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The pool (N, K, P, E) uint8 (a slot's first D bytes are its codes), per-slot scale,
        zero (N, K, P) and the codes' offset, as views: x = (code - offset) * scale + zero."""
        pool = (self.allocator.k_pool, self.allocator.v_pool)[stream][layer]  # (N, K, P, E)
        N, K, P, _ = pool.shape
        no_zero = torch.zeros(()).expand(N, K, P)  # (N, K, P), no copy
        if self.scheme.fp8:
            scale = self.fp8_scales[layer][stream]
            scale = torch.ones(()) if scale is None else scale  # None: no token stored yet
            return pool, scale.reshape(1, -1, 1).expand(N, K, P), no_zero, 0.0
        D = self.head_dim
        scale = pool[..., D : D + 4].view(torch.float32)[..., 0]  # (N, K, P) the fp32 scales
        if self.scheme.symmetric:  # signed codes stored as unsigned bytes: value = code - 128
            return pool, scale, no_zero, 128.0
        return pool, scale, pool[..., D + 4 : D + 8].view(torch.float32)[..., 0], 0.0

    def _chunk(self, layer: int, stream: int, data: torch.Tensor, valid: torch.Tensor) -> Chunk:
        """Bytes (B, K, n, E) of a chunk -> a `Chunk` (codes with their scales beside them)."""
        s = self.scheme
        if s.fp8:
            x = fp8_as_half(data).float() * valid  # (B, K, n, D)
            scale = self.fp8_scales[layer][stream]
            scale = torch.ones(1, 1, 1, 1) if scale is None else scale  # None: nothing stored
            return Chunk(x, scale / FP8_IN_HALF)
        if s.key == "group":
            return Chunk(self._decode(layer, stream, data) * valid)  # (B, K, n, D)
        codes, scale, zero = self._split(data)  # scale, zero: (B, K, n, 1)
        scale = scale * valid
        zero = -(2 ** (s.bits - 1)) * scale if zero is None else zero * valid
        x = unpack(codes, s.bits)  # (B, K, n, D)
        return Chunk(x.float(), scale, zero)  # x: (B, K, n, D) codes

    # ---- state -----------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return super().checkpoint() | {"fp8_scales": [list(s) for s in self.fp8_scales]}

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        self.fp8_scales = [list(s) for s in state["fp8_scales"]]

    def reset(self) -> None:
        super().reset()
        if self.allocator.num_used == 0:  # nothing left that the FP8 scales describe
            self.fp8_scales = [[None, None] for _ in range(self.n_layers)]

    def _token_bytes(self) -> int:
        """Bytes of one token's codes and scales over all layers, K and V."""
        E = self.allocator.k_pool[0].shape[-1]
        return 2 * self.n_layers * self.n_kv_heads * E

    def __repr__(self) -> str:
        return super().__repr__().replace("PagedKVCache(", "PagedQuantKVCache(", 1)[:-1] + (
            f", {self.scheme.label()})"
        )
