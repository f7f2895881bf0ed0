"""Quantized KV cache: int8 / int4 / int2 codes with fp32 scales, and the KIVI scheme.

Pure functions first: `quantize(x)` turns a float tensor x of shape (..., S, D) (S tokens, D
channels, as in the cache layout (B, K, S, D)) into a `QuantizedTensor`; `dequantize` turns it
back. One *group* of numbers shares one fp32 scale (and, when asymmetric, one fp32 zero point):

    granularity   a group is                                   scale, zero: shape
    'token'       the D channels of one token                  (..., S, 1)
    'group'       group_size consecutive channels of a token   (..., S, D // group_size)
    'channel'     one channel over group_size consecutive      (..., S // group_size, D)
                  tokens (all S tokens when group_size=None)

Codes are unsigned integers in [0, 2**bits - 1]:

    symmetric   scale = max|x| / (2**(bits-1) - 1),   code = round(x / scale) + 2**(bits-1),
                x_hat = (code - 2**(bits-1)) * scale
    asymmetric  scale = (max x - min x) / (2**bits - 1),   zero = min x,
                code = round((x - zero) / scale),   x_hat = code * scale + zero

Every x lies inside its group's representable range, so nothing is clipped and
|x - x_hat| <= scale / 2 for every element: at most half a quantization step (up to fp32
round-off). Scales and zero points are computed in fp32 whatever the input dtype.

Packing: `data` is uint8 of shape (..., S, D * bits // 8). The 8 // bits codes of channels
(j * 8 // bits ... (j + 1) * 8 // bits - 1) share byte j, the first in the lowest bits: int4
puts channel 2j in the low nibble and 2j + 1 in the high nibble; int8 is one code per byte.

`QuantizedKVCache` implements the cache interface of `kvlib.cache` on top of these functions:
it quantizes keys and values as they are appended and dequantizes on read, so `update` returns
(B, K, S, D) tensors of the cache's float dtype and the model runs on it unchanged. Its
`QuantScheme` picks the bits and granularity of keys and values and a full-precision residual
of R tokens. KIVI (Liu et al. 2024) quantizes keys per channel and values per token: a key
scale needs a group of tokens, so keys wait in full precision until R of them have arrived
and are then quantized per channel as one block, while values keep the R most recent tokens
in full precision and quantize each older token per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvlib.cache import Cache, KVCacheError
from kvlib.config import ModelConfig, check_int, dtype_bytes

Granularity = Literal["token", "channel", "group"]
GRANULARITIES = ("token", "channel", "group")
BITS = (2, 4, 8)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_SCALE = 1e-30  # a group of equal numbers gets this scale instead of 0 (no 0 / 0)


# ---- checks ------------------------------------------------------------------------------------


def _check_bits(bits: object) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} (codes pack into whole bytes), got {bits!r}")
    return bits


def _check_granularity(
    granularity: object, group_size: object, S: int | None, D: int | None
) -> int | None:
    """Validate granularity and group_size against S tokens and D channels; return group_size."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if group_size is not None:
        check_int("group_size", group_size)
    if granularity == "token" and group_size is not None:
        raise ValueError(
            "granularity 'token' uses all D channels of a token as one group: pass "
            "group_size=None (or granularity='group' for groups of channels)"
        )
    if granularity == "group":
        if group_size is None:
            raise ValueError("granularity 'group' needs group_size: channels per group")
        if D is not None and D % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {D} channels (last axis): "
                "pick a divisor of D"
            )
    if granularity == "channel" and group_size is not None and S is not None and S % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {S} tokens (second-to-last axis): "
            "per-channel scales need whole groups of tokens"
        )
    return group_size


# ---- packing -----------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) in [0, 2**bits) -> packed uint8 (..., D * bits // 8).

    Byte j holds the codes of channels j*n ... j*n + n - 1 (n = 8 // bits), the first in the
    lowest bits.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 torch.Tensor, got {getattr(codes, 'dtype', codes)}")
    n = 8 // bits
    if codes.ndim == 0 or codes.shape[-1] % n:
        raise ValueError(
            f"the last axis ({tuple(codes.shape)}) must be a multiple of {n} to pack {bits}-bit "
            "codes into whole bytes"
        )
    if n == 1:
        return codes.clone()
    if bool((codes >> bits).any()):
        raise ValueError(f"codes must be in [0, {2**bits - 1}] to pack at {bits} bits")
    D = codes.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], D // n, n)  # (..., D/n, n)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (n,)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # (..., D/n): disjoint bits, sum = or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (..., D * bits // 8) -> uint8 codes (..., D)."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(
            f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', packed)}"
        )
    n = 8 // bits
    if n == 1:
        return packed.clone()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (n,)
    mask = (1 << bits) - 1
    codes = (packed[..., None] >> shifts) & mask  # (..., D/n, n)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * n)  # (..., D)


# ---- quantize / dequantize ---------------------------------------------------------------------


def _groups(x: torch.Tensor, granularity: Granularity, group_size: int | None) -> torch.Tensor:
    """(..., S, D) -> a view whose last two axes are (groups, members) or (groups, members, D)."""
    *lead, S, D = x.shape
    if granularity == "channel":
        g = S if group_size is None else group_size
        return x.reshape(*lead, S // g, g, D)  # (..., S/g, g, D): a group = one column block
    g = D if group_size is None else group_size
    return x.reshape(*lead, S, D // g, g)  # (..., S, D/g, g): a group = part of one row


def _per_group(s: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Scales or zero points, shaped to broadcast against `_groups`."""
    if granularity == "channel":
        return s[..., :, None, :]  # (..., S/g, 1, D)
    return s[..., None]  # (..., S, D/g, 1)


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed codes plus fp32 scales (and zero points) of one tensor (see the module docstring).

    data: uint8 (..., S, D * bits // 8); scale, zero: fp32, shape set by the granularity;
    zero is None when symmetric. `shape` and `dtype` are those of the original tensor.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    granularity: Granularity
    group_size: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes + scales + zero points."""
        total = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def step(self) -> torch.Tensor:
        """fp32 (..., S, D): the quantization step (scale) of every element's group."""
        ones = torch.ones(self.shape, dtype=torch.float32, device=self.data.device)  # (..., S, D)
        grouped = _groups(ones, self.granularity, self.group_size)
        return (grouped * _per_group(self.scale, self.granularity)).reshape(self.shape)


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    *,
    granularity: Granularity = "token",
    group_size: int | None = None,
    symmetric: bool = True,
) -> QuantizedTensor:
    """Quantize x (..., S, D) to `bits`-bit codes with one fp32 scale per group.

    See the module docstring for the groups, the formulas and the packed layout. The error of
    every element after `dequantize` is at most half its group's step (`QuantizedTensor.step`).
    """
    bits = _check_bits(bits)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"x must be float16, bfloat16 or float32 (scales are fp32), got {x.dtype}; "
            "convert it with .float()"
        )
    if x.ndim < 2:
        raise ValueError(
            f"x must have shape (..., S, D) with at least 2 dims, got {tuple(x.shape)}"
        )
    *lead, S, D = x.shape
    group_size = _check_granularity(granularity, group_size, S, D)
    if D * bits % 8:
        raise ValueError(
            f"D={D} channels at {bits} bits do not fill whole bytes: D must be a "
            f"multiple of {8 // bits}"
        )
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds nan or inf: quantization needs finite numbers")

    xf = x.float()  # scales, zero points and codes computed in fp32
    xg = _groups(xf, granularity, group_size)  # (..., S, D/g, g) or (..., S/g, g, D)
    axis = -2 if granularity == "channel" else -1  # the axis a group spans
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xg.abs().amax(axis) / qmax).clamp(min=_MIN_SCALE)  # (..., groups)
        codes = torch.round(xg / _per_group(scale, granularity)) + 2 ** (bits - 1)
        zero = None
    else:
        lo, hi = xg.amin(axis), xg.amax(axis)  # (..., groups)
        scale = ((hi - lo) / (2**bits - 1)).clamp(min=_MIN_SCALE)
        codes = torch.round((xg - _per_group(lo, granularity)) / _per_group(scale, granularity))
        zero = lo
    codes = codes.clamp(0, 2**bits - 1).to(torch.uint8).reshape(x.shape)  # (..., S, D)
    return QuantizedTensor(
        data=pack(codes, bits),  # (..., S, D * bits / 8)
        scale=scale,
        zero=zero,
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Codes back to numbers: (..., S, D) of `dtype` (default: the dtype quantized)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    dtype = qt.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    codes = unpack(qt.data, qt.bits).float()  # (..., S, D) fp32
    cg = _groups(codes, qt.granularity, qt.group_size)  # (..., S, D/g, g) or (..., S/g, g, D)
    if qt.zero is None:
        x = (cg - 2 ** (qt.bits - 1)) * _per_group(qt.scale, qt.granularity)
    else:
        x = cg * _per_group(qt.scale, qt.granularity) + _per_group(qt.zero, qt.granularity)
    return x.reshape(qt.shape).to(dtype)  # (..., S, D)


def roundtrip(
    x: torch.Tensor,
    bits: int = 8,
    *,
    granularity: Granularity = "token",
    group_size: int | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """dequantize(quantize(x, ...)): what x looks like after a trip through the codes."""
    qt = quantize(x, bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
    return dequantize(qt)


# ---- schemes for keys and values ---------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """How a `QuantizedKVCache` stores keys and values.

    bits: 2, 4 or 8. key, value: granularity of each ('token', 'group' or 'channel');
    group_size: channels per group for 'group'. residual: R, the tokens kept in full precision.
    A 'channel' stream is quantized in blocks of R tokens (one scale per channel per block), so
    it needs R >= 1; its last S mod R tokens wait in full precision. A 'token' or 'group' stream
    keeps its R most recent tokens in full precision and quantizes every older token.
    """

    bits: int = 8
    key: Granularity = "token"
    value: Granularity = "token"
    group_size: int | None = None
    symmetric: bool = True
    residual: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        for stream in (self.key, self.value):
            gs = self.group_size if stream == "group" else None
            _check_granularity(stream, gs, None, None)
        if "group" in (self.key, self.value) and self.group_size is None:
            raise ValueError("a 'group' stream needs group_size (channels per group)")
        if not isinstance(self.residual, int) or isinstance(self.residual, bool):
            raise ValueError(f"residual must be an int >= 0, got {self.residual!r}")
        if self.residual < 0:
            raise ValueError(f"residual must be an int >= 0, got {self.residual}")
        if "channel" in (self.key, self.value) and self.residual < 1:
            raise ValueError(
                "a per-channel stream needs residual >= 1: its scales cover blocks of R tokens, "
                "and the tokens of an unfilled block wait in full precision"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    def granularity(self, stream: str) -> Granularity:
        """The granularity of 'key' or 'value'."""
        if stream not in ("key", "value"):
            raise ValueError(f"stream must be 'key' or 'value', got {stream!r}")
        return self.key if stream == "key" else self.value

    def label(self) -> str:
        """A short description such as 'int4 key=channel value=token R=32 asym'."""
        sym = "sym" if self.symmetric else "asym"
        g = f" g={self.group_size}" if "group" in (self.key, self.value) else ""
        return f"int{self.bits} key={self.key} value={self.value}{g} R={self.residual} {sym}"


def kivi(bits: int = 2, residual: int = 32, group_size: int | None = None) -> QuantScheme:
    """KIVI (Liu et al. 2024): asymmetric; keys per channel in blocks of R tokens, values per
    token (in groups of `group_size` channels when given); R recent tokens in full precision."""
    return QuantScheme(
        bits=bits,
        key="channel",
        value="token" if group_size is None else "group",
        group_size=group_size,
        symmetric=False,
        residual=residual,
        name=f"KIVI-{bits}",
    )


def n_quantized(granularity: Granularity, residual: int, S: int) -> int:
    """Of S tokens in a stream, how many are stored quantized (the rest in full precision)."""
    if granularity == "channel":
        return S // residual * residual  # whole blocks of R tokens
    return max(S - residual, 0)  # all but the R most recent


def quantize_stream(x: torch.Tensor, scheme: QuantScheme, stream: str) -> torch.Tensor:
    """The reference path: x (B, K, S, D), all S tokens of one stream ('key' or 'value'), as a
    `QuantizedKVCache` holding exactly these tokens returns it (quantized part dequantized,
    full-precision residual untouched)."""
    g = scheme.granularity(stream)
    nq = n_quantized(g, scheme.residual, x.shape[-2])
    if nq == 0:
        return x.clone()
    head = roundtrip(
        x[..., :nq, :],
        scheme.bits,
        granularity=g,
        group_size=scheme.residual if g == "channel" else scheme.group_size,
        symmetric=scheme.symmetric,
    )  # (B, K, nq, D)
    return torch.cat([head, x[..., nq:, :]], dim=-2)  # (B, K, S, D)


SCHEMES: dict[str, QuantScheme] = {
    "int8 per-token": QuantScheme(8, "token", "token", name="int8 per-token"),
    "int4 per-token": QuantScheme(4, "token", "token", symmetric=False, name="int4 per-token"),
    "int4 per-channel": QuantScheme(
        4, "channel", "channel", symmetric=False, residual=32, name="int4 per-channel"
    ),
    "int2 per-token": QuantScheme(2, "token", "token", symmetric=False, name="int2 per-token"),
    "KIVI-4": kivi(4, residual=32),
    "KIVI-2": kivi(2, residual=32),
}


# ---- the cache ---------------------------------------------------------------------------------


class _Stream:
    """One layer's keys or values: packed codes, scales, zero points and the fp residual.

    codes: (B, K, S_max, D * bits / 8) uint8
    scale, zero: (B, K, S_max, n_groups) fp32 ('token'/'group'), (B, K, S_max // R, D) ('channel')
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
        if gran == "channel":
            scale_shape = (B, K, S_max // self.R, D)  # (B, K, S_max/R, D)
        else:
            scale_shape = (B, K, S_max, D // (self.group_size or D))  # (B, K, S_max, D/g)
        self.codes = torch.zeros(B, K, S_max, D * self.bits // 8, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
        self.zero = (
            None if self.symmetric else torch.zeros(scale_shape, dtype=torch.float32, device=device)
        )
        self.resid = torch.zeros(B, K, self.R, D, dtype=dtype, device=device)  # (B, K, R, D)

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
        if m > 0:
            qt = quantize(
                pending[:, :, :m],
                self.bits,
                granularity=self.gran,
                group_size=self.group_size,
                symmetric=self.symmetric,
            )
        return qt, pending[:, :, m:], n_q

    def commit(self, qt: QuantizedTensor | None, resid: torch.Tensor, n_q: int) -> None:
        if qt is not None:
            self.codes[:, :, self.n_q : n_q] = qt.data
            rows = self._rows(self.n_q, n_q)
            self.scale[:, :, rows] = qt.scale
            if self.zero is not None:
                self.zero[:, :, rows] = qt.zero
        self.n_q = n_q
        self.resid[:, :, : resid.shape[2]] = resid

    def read(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The (B, K, length, D) tensor: dequantized slots, then the residual."""
        resid = self.resid[:, :, : length - self.n_q]  # (B, K, r, D)
        if self.n_q == 0:
            return resid.clone()
        B, K, _, D = resid.shape
        rows = self._rows(0, self.n_q)
        qt = QuantizedTensor(
            data=self.codes[:, :, : self.n_q],
            scale=self.scale[:, :, rows],
            zero=None if self.zero is None else self.zero[:, :, rows],
            bits=self.bits,
            granularity=self.gran,
            group_size=self.group_size,
            shape=(B, K, self.n_q, D),
            dtype=dtype,
        )
        return torch.cat([dequantize(qt, dtype), resid], dim=2)  # (B, K, length, D)

    def crop(self, length: int, n: int, dtype: torch.dtype) -> None:
        """Keep slots [0, n). Tokens of a cut per-channel block move back to the residual as
        their dequantized values, so reads after the crop equal the first n slots before it."""
        if n >= self.n_q:
            return  # residual shrinks: slots [n, length) are simply forgotten
        keep = n_quantized(self.gran, self.R, n) if self.gran == "channel" else n
        full = self.read(self.n_q, dtype)[:, :, keep:n]  # (B, K, n - keep, D)
        self.n_q = keep
        self.resid[:, :, : n - keep] = full

    def nbytes(self, lo: int, hi: int, D: int, dtype: torch.dtype) -> int:
        """Bytes one row and one kv head spend on slots [lo, hi)."""
        if hi <= lo:
            return 0
        q_hi = min(hi, self.n_q)
        n_codes = max(q_hi - lo, 0)
        per_group = 4 if self.symmetric else 8  # fp32 scale (+ fp32 zero point)
        if n_codes == 0:
            groups = 0
        elif self.gran == "channel":
            groups = ((q_hi - 1) // self.R - lo // self.R + 1) * D  # blocks touched, D each
        else:
            groups = n_codes * (D // (self.group_size or D))
        n_resid = hi - max(lo, self.n_q)
        return n_codes * D * self.bits // 8 + groups * per_group + n_resid * D * dtype_bytes(dtype)


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
            raise TypeError(f"scheme must be a QuantScheme or a name, got {type(scheme).__name__}")
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
        args = (batch_size, n_kv_heads, max_seq_len, D, dtype, self.device)
        self.keys = [_Stream(scheme, scheme.key, *args) for _ in range(n_layers)]
        self.values = [_Stream(scheme, scheme.value, *args) for _ in range(n_layers)]

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
        return ks.read(pos + T, self.dtype), vs.read(pos + T, self.dtype)

    @property
    def capacity(self) -> int:
        return self.max_seq_len

    def checkpoint(self) -> dict:
        """Lengths, and per stream the quantized count and a copy of the small residual (the
        only storage a step rewrites; codes and scales are written past the quantized count)."""
        streams = [(st.n_q, st.resid.clone()) for st in self.keys + self.values]
        return super().checkpoint() | {"streams": streams}

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        for st, (n_q, resid) in zip(self.keys + self.values, state["streams"], strict=True):
            st.n_q = n_q
            st.resid.copy_(resid)

    def crop(self, n: int) -> None:
        """Keep the first n slots of every layer (see `_Stream.crop` for per-channel blocks)."""
        before = list(self._len)
        super().crop(n)  # validates n
        for layer, length in enumerate(before):
            self.keys[layer].crop(length, n, self.dtype)
            self.values[layer].crop(length, n, self.dtype)

    def reset(self) -> None:
        super().reset()
        for stream in self.keys + self.values:
            stream.n_q = 0

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
