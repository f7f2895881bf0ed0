"""How far a cache variant moves the model from a reference run: the book's quality measures.

    perplexity(logits, targets)      exp(mean next-token cross-entropy), in fp32
    agreement(logits, reference)     fraction of positions whose argmax token is the same
    relative_error(x, reference)     ||x - reference|| / ||reference|| (Frobenius), in fp32

Shapes: logits and reference (B, N, V); targets (B, N) token ids, targets[b, i] being the token
that logits[b, i] predicts. Chapters 6 and 8 compare quantized, paged and evicting caches with
them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvlib.errors import KVLibTypeError, KVLibValueError


def _check_logits(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.dtype.is_floating_point:
        raise KVLibValueError(
            f"{name} must be a floating (B, N, V) tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.numel() == 0:
        raise KVLibValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean cross-entropy of logits (B, N, V) against targets (B, N), in fp32."""
    _check_logits("logits", logits)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise KVLibTypeError(f"targets must be a tensor of token ids, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise KVLibValueError(
            f"targets {tuple(targets.shape)} must have the (B, N) of logits {tuple(logits.shape)}"
        )
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.long().flatten())  # (B*N, V)
    return math.exp(nll.item())


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of the (B, N) positions where logits and reference pick the same argmax token."""
    _check_logits("logits", logits)
    _check_logits("reference", reference)
    if logits.shape != reference.shape:
        raise KVLibValueError(
            f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - reference|| / ||reference|| over all elements, in fp32 (any equal shapes)."""
    for name, t in (("x", x), ("reference", reference)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise KVLibTypeError(f"{name} must be a floating tensor, got {type(t).__name__}")
    if x.shape != reference.shape:
        raise KVLibValueError(f"x {tuple(x.shape)} and reference {tuple(reference.shape)} differ")
    ref = reference.float()
    norm = ref.norm().item()
    if norm == 0.0:
        raise KVLibValueError("reference is all zeros: a relative error is undefined")
    return ((x.float() - ref).norm() / norm).item()
