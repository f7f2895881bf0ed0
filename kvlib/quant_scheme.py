"""How a quantized cache stores keys and values: `QuantScheme`, KIVI, FP8 and the named schemes.

A scheme picks, for keys and for values, the bits and granularity of their codes
(`kvlib.quantize`), and a full-precision residual of R recent tokens. `quantize_stream` is the
reference for what a cache holding a stream returns, `bytes_per_token` what a token costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.errors import KVLibValueError, check_bool, check_int
from kvlib.quantize import (
    FP8_GRANULARITIES,
    Granularity,
    _check_bits,
    _check_granularity,
    roundtrip,
)

# ---- schemes for keys and values ---------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """How a quantized cache stores keys and values.

    bits: 2, 4 or 8. key, value: granularity of each ('token', 'group' or 'channel'; FP8:
    'tensor' or 'head', with fp8=True and bits=8); group_size: channels per group for 'group'.
    residual: R, the tokens kept in full precision. A 'channel' stream is quantized in blocks
    of R tokens (one scale per channel per block), so it needs R >= 1; its last S mod R tokens
    wait in full precision. Any other stream keeps its R most recent tokens in full precision
    and quantizes every older token.
    """

    bits: int = 8
    key: Granularity = "token"
    value: Granularity = "token"
    group_size: int | None = None
    symmetric: bool = True
    residual: int = 0
    name: str = ""
    fp8: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        check_bool("symmetric", self.symmetric)
        check_bool("fp8", self.fp8)
        check_int("residual", self.residual, 0)
        if self.fp8:
            if self.bits != 8 or not self.symmetric or self.group_size is not None:
                raise KVLibValueError("an FP8 scheme has bits=8, symmetric=True, group_size=None")
            for stream in (self.key, self.value):
                if stream not in FP8_GRANULARITIES:
                    raise KVLibValueError(
                        f"FP8 key/value granularity must be one of {FP8_GRANULARITIES}, "
                        f"got {stream!r}"
                    )
            return
        for stream in (self.key, self.value):
            gs = self.group_size if stream == "group" else None
            _check_granularity(stream, gs, None, None)
        if "group" in (self.key, self.value) and self.group_size is None:
            raise KVLibValueError("a 'group' stream needs group_size (channels per group)")
        if "channel" in (self.key, self.value) and self.residual < 1:
            raise KVLibValueError(
                "a per-channel stream needs residual >= 1: its scales cover blocks of R tokens, "
                "and the tokens of an unfilled block wait in full precision"
            )

    def granularity(self, stream: str) -> Granularity:
        """The granularity of 'key' or 'value'."""
        if stream not in ("key", "value"):
            raise KVLibValueError(f"stream must be 'key' or 'value', got {stream!r}")
        return self.key if stream == "key" else self.value

    def label(self) -> str:
        """A short description such as 'int4 key=channel value=token R=32 asym'."""
        kind = "fp8-e4m3" if self.fp8 else f"int{self.bits}"
        sym = "sym" if self.symmetric else "asym"
        g = f" g={self.group_size}" if "group" in (self.key, self.value) else ""
        return f"{kind} key={self.key} value={self.value}{g} R={self.residual} {sym}"

    def bytes_per_token(self, head_dim: int, n_kv_heads: int = 1, n_layers: int = 1) -> float:
        """Bytes one token's keys and values take once quantized (codes plus scales and zero
        points, spread over the tokens a scale covers). The R full-precision tokens and a
        per-tensor or per-head FP8 scale are a fixed cost, not counted here."""
        D = check_int("head_dim", head_dim)
        check_int("n_kv_heads", n_kv_heads)
        check_int("n_layers", n_layers)
        per_group = 4 if self.symmetric else 8  # fp32 scale (+ fp32 zero point)
        total = 0.0
        for gran in (self.key, self.value):
            total += D * self.bits / 8
            if gran == "token":
                total += per_group
            elif gran == "group":
                total += per_group * D / self.group_size
            elif gran == "channel":
                total += per_group * D / self.residual
        return total * n_kv_heads * n_layers


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


def fp8(granularity: Granularity = "head") -> QuantScheme:
    """FP8 e4m3 keys and values with one scale per kv head ('head') or per tensor ('tensor'),
    fixed at a layer's first write (vLLM's FP8 KV cache)."""
    return QuantScheme(8, granularity, granularity, fp8=True, name=f"FP8 per-{granularity}")


def n_quantized(granularity: Granularity, residual: int, S: int) -> int:
    """Of S tokens in a stream, how many are stored quantized (the rest in full precision)."""
    if granularity == "channel":
        return S // residual * residual  # whole blocks of R tokens
    return max(S - residual, 0)  # all but the R most recent


def quantize_stream(x: torch.Tensor, scheme: QuantScheme, stream: str) -> torch.Tensor:
    """The reference path: x (B, K, S, D), all S tokens of one stream ('key' or 'value'), as a
    quantized cache holding exactly these tokens returns it (quantized part dequantized,
    full-precision residual untouched; FP8 scales from these S tokens)."""
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
    "FP8 per-tensor": fp8("tensor"),
    "FP8 per-head": fp8("head"),
}
