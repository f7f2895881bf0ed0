"""Caches for streams longer than the model's context: keep a budget of tokens, evict the rest.

`kvlib.eviction.base` holds what every policy shares (the fixed-budget cache, RoPE re-rotation,
undo, the attention each key receives); `kvlib.eviction.policies` holds the four policies.
"""

from kvlib.eviction.base import POSITIONS, EvictionCache, Positions, attention_received
from kvlib.eviction.policies import (
    EVICTION_POLICIES,
    FullCache,
    H2OCache,
    SinkCache,
    SlidingWindowCache,
)

__all__ = [
    "EVICTION_POLICIES",
    "POSITIONS",
    "EvictionCache",
    "FullCache",
    "H2OCache",
    "Positions",
    "SinkCache",
    "SlidingWindowCache",
    "attention_received",
]
