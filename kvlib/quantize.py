"""Quantizers: int8 / int4 / int2 codes with fp32 scales, FP8 (e4m3), and the cache schemes.

Pure functions. `quantize(x)` turns a float tensor x of shape (..., S, D) (S tokens, D
channels, as in the cache layout (B, K, S, D)) into a `QuantizedTensor`; `dequantize` turns it
back. One *group* of numbers shares one fp32 scale (and, when asymmetric, one fp32 zero point):

    granularity   a group is                                   scale, zero: shape
    'token'       the D channels of one token                  (..., S, 1)
    'group'       group_size consecutive channels of a token   (..., S, D // group_size)
    'channel'     one channel over group_size consecutive      (..., S // group_size, D)
                  tokens (all S tokens when group_size=None)

Integer codes are unsigned in [0, 2**bits - 1]:

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

FP8 (`quantize_fp8`): each number becomes a float8 e4m3 (1 sign, 4 exponent, 3 mantissa bits;
largest 448) after division by an fp32 scale, one per tensor ('tensor') or per kv head
('head': axis -3 of (..., K, S, D)), as vLLM's FP8 KV cache offers. The step is relative, not
absolute: about 1/16 of the number's own size (3 mantissa bits), so small numbers keep their
precision where an int8 code would round them to 0. `data` holds the e4m3 bit patterns as uint8.

How a cache applies these to keys and values (`QuantScheme`, the named `SCHEMES`) is in
`kvlib.quant_scheme`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvlib.errors import KVLibTypeError, KVLibValueError, check_bool, check_int

Granularity = Literal["token", "channel", "group", "tensor", "head"]
GRANULARITIES = ("token", "channel", "group")  # integer codes
FP8_GRANULARITIES = ("tensor", "head")  # FP8 codes: one scale per tensor or per kv head
BITS = (2, 4, 8)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_MAX = 448.0  # the largest finite float8 e4m3fn
FP8_HEADROOM = 4.0  # a cache's first-write scale maps max |x| to FP8_MAX / FP8_HEADROOM
_MIN_SCALE = 1e-30  # a group of equal numbers gets this scale instead of 0 (no 0 / 0)


# ---- checks ------------------------------------------------------------------------------------


def _check_bits(bits: object) -> int:
    check_int("bits", bits)
    if bits not in BITS:
        raise KVLibValueError(
            f"bits must be one of {BITS} (codes pack into whole bytes), got {bits!r}"
        )
    return bits


def _check_granularity(
    granularity: object, group_size: object, S: int | None, D: int | None
) -> int | None:
    """Validate granularity and group_size against S tokens and D channels; return group_size."""
    if granularity not in GRANULARITIES:
        raise KVLibValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if group_size is not None:
        check_int("group_size", group_size)
    if granularity == "token" and group_size is not None:
        raise KVLibValueError(
            "granularity 'token' uses all D channels of a token as one group: pass "
            "group_size=None (or granularity='group' for groups of channels)"
        )
    if granularity == "group":
        if group_size is None:
            raise KVLibValueError("granularity 'group' needs group_size: channels per group")
        if D is not None and D % group_size:
            raise KVLibValueError(
                f"group_size={group_size} does not divide the {D} channels (last axis): "
                "pick a divisor of D"
            )
    if granularity == "channel" and group_size is not None and S is not None and S % group_size:
        raise KVLibValueError(
            f"group_size={group_size} does not divide the {S} tokens (second-to-last axis): "
            "per-channel scales need whole groups of tokens"
        )
    return group_size


def _check_float(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise KVLibTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise KVLibTypeError(
            f"{name} must be float16, bfloat16 or float32 (scales are fp32), got {x.dtype}; "
            "convert it with .float()"
        )
    if x.ndim < 2:
        raise KVLibValueError(
            f"{name} must have shape (..., S, D) with at least 2 dims, got {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise KVLibValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise KVLibValueError(f"{name} holds nan or inf: quantization needs finite numbers")
    return x


# ---- packing -----------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) in [0, 2**bits) -> packed uint8 (..., D * bits // 8).

    Byte j holds the codes of channels j*n ... j*n + n - 1 (n = 8 // bits), the first in the
    lowest bits.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise KVLibTypeError(
            f"codes must be a uint8 torch.Tensor, got {getattr(codes, 'dtype', codes)}"
        )
    n = 8 // bits
    if codes.ndim == 0 or codes.shape[-1] % n:
        raise KVLibValueError(
            f"the last axis ({tuple(codes.shape)}) must be a multiple of {n} to pack {bits}-bit "
            "codes into whole bytes"
        )
    if n == 1:
        return codes.clone()
    if bool((codes >> bits).any()):
        raise KVLibValueError(f"codes must be in [0, {2**bits - 1}] to pack at {bits} bits")
    D = codes.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], D // n, n)  # (..., D/n, n)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (n,)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # (..., D/n): disjoint bits, sum = or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (..., D * bits // 8) -> uint8 codes (..., D). int8 codes are
    already one per byte: `packed` itself comes back, not a copy."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise KVLibTypeError(
            f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', packed)}"
        )
    n = 8 // bits
    if n == 1:
        return packed
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
    """Scales or zero points, shaped to broadcast against `_groups` (or, FP8, against x)."""
    if granularity in FP8_GRANULARITIES:
        return s  # already (1, ..., 1) or (..., K, 1, 1)
    if granularity == "channel":
        return s[..., :, None, :]  # (..., S/g, 1, D)
    return s[..., None]  # (..., S, D/g, 1)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes plus fp32 scales (and zero points) of one tensor (see the module docstring).

    data: uint8 (..., S, D * bits // 8) (FP8: the e4m3 bit patterns, (..., S, D)); scale, zero:
    fp32, shape set by the granularity; zero is None when symmetric. `shape` and `dtype` are
    those of the original tensor.
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
    def fp8(self) -> bool:
        return self.granularity in FP8_GRANULARITIES

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes + scales + zero points."""
        total = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def step(self) -> torch.Tensor:
        """fp32 (..., S, D): the quantization step of every element (FP8: of its exponent
        range, so half of it bounds the error of numbers in the normal range)."""
        if self.fp8:
            x = fp8_to_float(self.data).abs()  # (..., S, D) the stored e4m3 numbers
            exponent = torch.floor(torch.log2(x.clamp(min=2.0**-6)))
            return 2.0 ** (exponent - 3) * self.scale  # 3 mantissa bits
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
    `granularity` 'tensor' or 'head' gives FP8 codes (`quantize_fp8`; bits must be 8).
    """
    bits = _check_bits(bits)
    check_bool("symmetric", symmetric)
    if granularity in FP8_GRANULARITIES:
        if bits != 8 or not symmetric or group_size is not None:
            raise KVLibValueError(
                f"FP8 granularity {granularity!r} takes bits=8, symmetric=True, group_size=None"
            )
        return quantize_fp8(x, granularity)
    x = _check_float(x)
    *lead, S, D = x.shape
    group_size = _check_granularity(granularity, group_size, S, D)
    if D * bits % 8:
        raise KVLibValueError(
            f"D={D} channels at {bits} bits do not fill whole bytes: D must be a "
            f"multiple of {8 // bits}"
        )
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
        raise KVLibTypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    dtype = qt.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise KVLibTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if qt.fp8:
        return (fp8_to_float(qt.data) * qt.scale).to(dtype)  # (..., S, D)
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


# ---- FP8 (e4m3) --------------------------------------------------------------------------------


def fp8_scale(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """fp32 scale that maps max|x| to FP8_MAX: shape (1, ..., 1) ('tensor') or (..., K, 1, 1)
    ('head', one per index of axis -3 of x (..., K, S, D), the max over every other axis)."""
    if granularity == "tensor":
        amax = x.abs().amax().float().reshape((1,) * x.ndim)  # (1, ..., 1)
    elif granularity == "head":
        if x.ndim < 3:
            raise KVLibValueError(f"per-head FP8 needs x of shape (..., K, S, D), got {x.shape}")
        amax = x.abs().float().amax(dim=(-2, -1), keepdim=True)  # (..., K, 1, 1)
        amax = amax.amax(dim=tuple(range(x.ndim - 3)), keepdim=True)  # (1, .., K, 1, 1)
    else:
        raise KVLibValueError(
            f"FP8 granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}"
        )
    return (amax / FP8_MAX).clamp(min=_MIN_SCALE)


def quantize_fp8(
    x: torch.Tensor, granularity: Granularity = "tensor", scale: torch.Tensor | None = None
) -> QuantizedTensor:
    """x (..., S, D) -> FP8 e4m3 codes (uint8 bit patterns, (..., S, D)) and an fp32 scale.

    The scale is `fp8_scale(x, granularity)` unless given (a cache fixes it at its first write,
    as vLLM does with scales computed from the first batch, times FP8_HEADROOM so that later
    numbers up to that many times larger still fit: FP8's step is relative, so the headroom costs
    precision only below 2**-6 of the range); numbers beyond FP8_MAX * scale saturate at it, as
    vLLM's conversion does.
    """
    x = _check_float(x)
    if scale is None:
        scale = fp8_scale(x, granularity)
    if granularity not in FP8_GRANULARITIES:
        raise KVLibValueError(
            f"FP8 granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}"
        )
    y = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)  # (..., S, D) in e4m3's range
    data = y.to(torch.float8_e4m3fn).view(torch.uint8)  # (..., S, D) bit patterns
    return QuantizedTensor(
        data=data,
        scale=scale,
        zero=None,
        bits=8,
        granularity=granularity,
        group_size=None,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


FP8_IN_HALF = 2.0**-8  # fp8_as_half(data) = the e4m3 numbers times this


def fp8_as_half(data: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bit patterns (...) -> float16 (...) holding their values times 2**-8.

    torch's float8 -> float32 cast runs one element at a time on the CPU. This is whole-tensor
    integer arithmetic: e4m3 (s eeee mmm, exponent bias 7) placed in the bits of a float16
    (s eeeee mmmmmmmmmm, bias 15) as s 0eeee mmm0000000 is the same number times 2**-8, normal
    and subnormal alike (the biases differ by 8). Exact: float16 holds every e4m3 number.
    """
    h = data.view(torch.int8).to(torch.int16) * 128  # s s eeee mmm 0000000 (sign extended)
    return (h & ~0x4000).view(torch.float16)  # clear the copy of the sign in bit 14


def fp8_to_float(data: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bit patterns (...) -> their fp32 values (...)."""
    return fp8_as_half(data).float() / FP8_IN_HALF  # (...) fp32
