"""How a quantized cache stores one layer's keys or values: codes, scales, zero points and the
full-precision residual, written a step at a time and read back whole or by chunks.

`kvlib.quant.QuantizedKVCache` holds one `QuantStream` per layer for K and one for V; its
`QuantScheme` (`kvlib.quant_scheme`) picks the bits, the granularity and the residual R.
"""

from __future__ import annotations

import torch

from kvlib.config import dtype_bytes
from kvlib.quant_attention import Chunk
from kvlib.quant_scheme import QuantScheme, n_quantized
from kvlib.quantize import (
    FP8_HEADROOM,
    FP8_IN_HALF,
    Granularity,
    QuantizedTensor,
    dequantize,
    fp8_as_half,
    fp8_scale,
    fp8_to_float,
    quantize,
    quantize_fp8,
    unpack,
)


class QuantStream:
    """One layer's keys or values: packed codes, scales, zero points and the fp residual.

    codes: (B, K, S_max, D * bits / 8) uint8 (FP8: the e4m3 bit patterns, (B, K, S_max, D))
    scale, zero: (B, K, S_max, n_groups) fp32 ('token'/'group'), (B, K, S_max // R, D) ('channel');
        FP8: one scale (1, 1, 1, 1) ('tensor') or (1, K, 1, 1) ('head'), None until the first write
    resid: (B, K, R, D) of the cache dtype; slots [n_q, len) live here, at resid[:, :, : len - n_q]
    """

    def __init__(self, scheme: QuantScheme, gran: Granularity, B, K, S_max, D, dtype, device):
        self.gran = gran
        self.bits = scheme.bits
        self.R = scheme.residual
        self.symmetric = scheme.symmetric
        # a scale covers R tokens of one channel, g channels of one token, or a whole token
        self.group_size = {"channel": self.R, "group": scheme.group_size}.get(gran)
        self.n_q = 0  # slots stored quantized, [0, n_q)
        self.fp8 = scheme.fp8
        self.resid = torch.zeros(B, K, self.R, D, dtype=dtype, device=device)  # (B, K, R, D)
        if self.fp8:
            self.codes = torch.zeros(B, K, S_max, D, dtype=torch.uint8, device=device)
            self.scale, self.zero = None, None  # fixed by the first write
            return
        if gran == "channel":
            scale_shape = (B, K, S_max // self.R, D)  # (B, K, S_max/R, D)
        else:
            scale_shape = (B, K, S_max, D // (self.group_size or D))  # (B, K, S_max, D/g)
        self.codes = torch.zeros(B, K, S_max, D * self.bits // 8, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
        self.zero = (
            None if self.symmetric else torch.zeros(scale_shape, dtype=torch.float32, device=device)
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.resid) if t is not None]

    def _rows(self, a: int, b: int) -> slice:
        """Rows of the scale buffer that describe slots [a, b) (a, b multiples of R if channel)."""
        return slice(a // self.R, b // self.R) if self.gran == "channel" else slice(a, b)

    def plan(self, length: int, x: torch.Tensor):
        """Compute (without writing) the new state after appending x (B, K, T, D) to `length`
        slots: (first slot to quantize, QuantizedTensor or None, new residual, new n_q)."""
        r = length - self.n_q
        pending = torch.cat([self.resid[:, :, :r], x], dim=2)  # (B, K, r + T, D)
        n_q = max(self.n_q, n_quantized(self.gran, self.R, length + x.shape[2]))
        m = n_q - self.n_q  # tokens of `pending` that get quantized now
        qt = None
        if m > 0 and self.fp8:
            scale = self.scale  # fixed by the first write, with headroom for larger numbers
            if scale is None:
                scale = fp8_scale(pending[:, :, :m], self.gran) * FP8_HEADROOM
            qt = quantize_fp8(pending[:, :, :m], self.gran, scale)
        elif m > 0:
            qt = quantize(
                pending[:, :, :m],
                self.bits,
                granularity=self.gran,
                group_size=self.group_size,
                symmetric=self.symmetric,
            )
        return qt, pending[:, :, m:], n_q

    def commit(self, qt: QuantizedTensor | None, resid: torch.Tensor, n_q: int) -> None:
        if qt is not None and self.fp8:
            self.codes[:, :, self.n_q : n_q] = qt.data
            self.scale = qt.scale
        elif qt is not None:
            self.codes[:, :, self.n_q : n_q] = qt.data
            rows = self._rows(self.n_q, n_q)
            self.scale[:, :, rows] = qt.scale
            if self.zero is not None:
                self.zero[:, :, rows] = qt.zero
        self.n_q = n_q
        self.resid[:, :, : resid.shape[2]] = resid

    def read(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The (B, K, length, D) tensor: dequantized slots, then the residual."""
        return self.read_rows(0, length, dtype)

    def read_rows(self, a: int, b: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Slots [a, b) as (B, K, b - a, D) of `dtype`: codes dequantized where they are, then
        the residual (a 'channel' stream dequantizes the whole blocks of R slots they touch)."""
        parts = []
        q_end = min(b, self.n_q)
        if a < q_end:
            B, K, _, D = self.resid.shape
            if self.fp8:
                x = fp8_to_float(self.codes[:, :, a:q_end]) * self.scale  # (B, K, n, D) fp32
            else:
                # a per-channel scale covers a block of R slots: dequantize whole blocks
                lo, hi = a, q_end
                if self.gran == "channel":
                    lo, hi = a // self.R * self.R, -(-q_end // self.R) * self.R
                rows = self._rows(lo, hi)
                x = dequantize(
                    QuantizedTensor(
                        data=self.codes[:, :, lo:hi],
                        scale=self.scale[:, :, rows],
                        zero=None if self.zero is None else self.zero[:, :, rows],
                        bits=self.bits,
                        granularity=self.gran,
                        group_size=self.group_size,
                        shape=(B, K, hi - lo, D),
                        dtype=dtype,
                    ),
                    dtype,
                )[:, :, a - lo : q_end - lo]  # (B, K, n, D)
            parts.append(x.to(dtype))
        if b > max(a, self.n_q):
            r0, r1 = max(a, self.n_q) - self.n_q, b - self.n_q
            parts.append(self.resid[:, :, r0:r1].to(dtype, copy=True))  # (B, K, r, D)
        if not parts:
            return self.resid[:, :, :0].to(dtype, copy=True)  # (B, K, 0, D)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, K, b - a, D)

    def coded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """codes (B, K, S_max, D) uint8, per-slot scale, zero (B, K, S_max) and the codes' offset
        for the compiled loop (int8 per token, or FP8 with its per-head or per-tensor scale spread
        over slots), as views: x = (code - offset) * scale + zero."""
        B, K, S_max, _ = self.codes.shape
        no_zero = torch.zeros(()).expand(B, K, S_max)  # (B, K, S_max), no copy
        if self.fp8:
            scale = self.scale.reshape(1, -1, 1).expand(B, K, S_max)  # (B, K, S_max), no copy
            return self.codes, scale, no_zero, 0.0
        scale = self.scale[..., 0]  # (B, K, S_max)
        if self.symmetric:  # signed codes stored as unsigned bytes: value = code - 2**(bits-1)
            return self.codes, scale, no_zero, float(2 ** (self.bits - 1))
        return self.codes, scale, self.zero[..., 0], 0.0

    def read_chunk(self, a: int, b: int) -> Chunk:
        """Slots [a, b) for the fused read. Codes with one scale per token (or per head, FP8)
        come back as fp32 codes with the scale and zero point beside them, to be factored out
        of the dot products; other slots (groups, per-channel blocks, the residual, a chunk
        spanning both) come back dequantized."""
        if b > self.n_q or self.gran in ("group", "channel"):
            return Chunk(self.read_rows(a, b))
        codes = self.codes[:, :, a:b]  # (B, K, n, D * bits / 8)
        if self.fp8:
            x = fp8_as_half(codes).float()  # (B, K, n, D): the numbers times FP8_IN_HALF
            return Chunk(x, self.scale / FP8_IN_HALF)  # scale (1, K or 1, 1, 1)
        scale = self.scale[:, :, a:b]  # (B, K, n, 1)
        zero = -(2 ** (self.bits - 1)) * scale if self.symmetric else self.zero[:, :, a:b]
        return Chunk(unpack(codes, self.bits).float(), scale, zero)  # x: (B, K, n, D) codes

    def crop(self, length: int, n: int, dtype: torch.dtype) -> None:
        """Keep slots [0, n). Tokens of a cut per-channel block move back to the residual as
        their dequantized values, so reads after the crop equal the first n slots before it."""
        if n >= self.n_q:
            return  # residual shrinks: slots [n, length) are simply forgotten
        keep = n_quantized(self.gran, self.R, n) if self.gran == "channel" else n
        full = self.read_rows(keep, n, dtype)  # (B, K, n - keep, D)
        self.n_q = keep
        self.resid[:, :, : n - keep] = full

    def nbytes(self, lo: int, hi: int, D: int, dtype: torch.dtype) -> int:
        """Bytes one row and one kv head spend on slots [lo, hi)."""
        if hi <= lo:
            return 0
        q_hi = min(hi, self.n_q)
        n_codes = max(q_hi - lo, 0)
        per_group = 4 if self.symmetric else 8  # fp32 scale (+ fp32 zero point)
        if n_codes == 0 or self.fp8:  # an FP8 scale is one per layer, not per token
            groups = 0
        elif self.gran == "channel":
            groups = ((q_hi - 1) // self.R - lo // self.R + 1) * D  # blocks touched, D each
        else:
            groups = n_codes * (D // (self.group_size or D))
        n_resid = hi - max(lo, self.n_q)
        code_bytes = D if self.fp8 else D * self.bits // 8
        return n_codes * code_bytes + groups * per_group + n_resid * D * dtype_bytes(dtype)
