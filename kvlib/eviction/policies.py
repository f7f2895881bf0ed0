"""Four eviction policies on `EvictionCache`: which tokens a fixed budget of W slots keeps.

    FullCache           never evicts (the reference); overflowing raises CacheFullError
    SlidingWindowCache  the last W tokens
    SinkCache           StreamingLLM (Xiao et al. 2024): the first n_sink tokens (the
                        "attention sinks") + the last W - n_sink
    H2OCache            Heavy-Hitter Oracle (Zhang et al. 2023): the n_recent most recent
                        tokens + the W - n_recent older ones with the largest accumulated
                        attention

Each one only chooses the slots to keep (`_keep`); storing, compacting, RoPE re-rotation and
undo are the base class's (`kvlib.eviction.base`). H2O also overrides `attend` to add the
attention each slot receives to its score. Shapes as in `kvlib.eviction.base`.
"""

from __future__ import annotations

import torch

from kvlib.attention import grouped_attention
from kvlib.errors import CacheFullError, KVCacheError, KVLibValueError, check_int
from kvlib.eviction.base import EvictionCache, attention_received


class FullCache(EvictionCache):
    """The reference: keeps every token; `prepare` raises CacheFullError past the budget."""

    policy = "full"

    def check_room(self, n: int) -> None:
        check_int("n", n, 0, error=KVCacheError)
        if self.seq_len + n > self.budget:
            raise CacheFullError(
                f"a full cache never evicts: it holds {self.seq_len} of {self.budget} tokens "
                f"and {n} more would overflow it (use an evicting cache for longer streams)"
            )

    def prepare(self, T: int) -> int:
        self._check_between_steps()
        self.check_room(T)
        if self.positions == "original":
            self._write_positions(0, T)
        return 0

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        raise CacheFullError("a full cache never evicts")  # `prepare` never asks it to


class SlidingWindowCache(EvictionCache):
    """Keeps the last `budget` tokens (the new ones included)."""

    policy = "window"

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        slots = torch.arange(n - m, n, device=self.device)  # (m,)
        return slots.expand(self.batch_size, self.n_kv_heads, m)  # (B, K, m)


class SinkCache(EvictionCache):
    """StreamingLLM: the first `n_sink` tokens of the stream + the last budget - n_sink."""

    policy = "sinks"

    def __init__(self, *args, n_sink: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_int("n_sink", n_sink, low=0, error=KVCacheError)
        if n_sink >= self.budget:
            raise KVCacheError(
                f"n_sink={n_sink} leaves no room for recent tokens in a budget of {self.budget}: "
                "need n_sink < budget"
            )
        self.n_sink = n_sink

    def _check_room(self, T: int) -> None:
        if T > self.budget - self.n_sink:
            raise KVLibValueError(
                f"{T} new tokens cannot fit beside {self.n_sink} sink tokens in a budget of "
                f"{self.budget}: feed at most {self.budget - self.n_sink} at a time"
            )

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        sinks = torch.arange(self.n_sink, device=self.device)  # (n_sink,)
        recent = torch.arange(n - (m - self.n_sink), n, device=self.device)  # (m - n_sink,)
        return torch.cat([sinks, recent]).expand(self.batch_size, self.n_kv_heads, m)  # (B,K,m)


class H2OCache(EvictionCache):
    """Heavy-Hitter Oracle: the `n_recent` newest tokens + the heaviest older ones.

    Each token's score is the attention it has received so far (summed over the query heads
    of its kv head and over every query since it arrived). It needs the queries, so it is fed
    through `attend`, the call the model makes per layer; `update` alone cannot score tokens.
    """

    policy = "h2o"

    def __init__(self, *args, n_recent: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n_recent = self.budget // 2 if n_recent is None else n_recent
        check_int("n_recent", n_recent, low=0, high=self.budget, error=KVCacheError)
        self.n_recent = n_recent
        B, K, W = self.batch_size, self.n_kv_heads, self.budget
        self.scores = [
            torch.zeros(B, K, W, dtype=torch.float32, device=self.device)
            for _ in range(self.n_layers)
        ]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise KVCacheError(
            "H2OCache ranks tokens by the attention they receive, so it needs the queries: "
            "feed it through attend(layer, q, k, v, mask), as the model does"
        )

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Store k, v; add the attention the T queries q (B, H, T, D) give every kept key to
        its score; return the attention output (B, H, T, D)."""
        self._check_q(q, k)
        k_all, v_all = self._append(layer, k.to(self.dtype), v.to(self.dtype))  # (B, K, S, D)
        S, T = k_all.shape[2], q.shape[2]
        scores = self.scores[layer].clone()  # a new tensor: the old one stays for rollback
        scores[:, :, S - T : S] = 0.0
        scores[:, :, :S] += attention_received(q, k_all)  # (B, K, S)
        self.scores[layer] = scores
        return grouped_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), mask)  # (B, H, T, D)

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        r = min(max(self.n_recent - T, 0), m)  # recent tokens kept from the cache
        h = m - r  # heavy hitters kept from the older n - r
        recent = torch.arange(n - r, n, device=self.device)  # (r,)
        recent = recent.expand(self.batch_size, self.n_kv_heads, r)  # (B, K, r)
        older = self.scores[layer][:, :, : n - r]  # (B, K, n - r)
        heavy = older.topk(h, dim=-1).indices.sort(dim=-1).values  # (B, K, h)
        return torch.cat([heavy, recent], dim=-1)  # (B, K, m)

    def _buffer_lists(self) -> list[list[torch.Tensor]]:
        return super()._buffer_lists() + [self.scores]

    @property
    def nbytes_allocated(self) -> int:
        return super().nbytes_allocated + sum(s.numel() * s.element_size() for s in self.scores)


EVICTION_POLICIES: dict[str, type[EvictionCache]] = {
    "full": FullCache,
    "window": SlidingWindowCache,
    "sinks": SinkCache,
    "h2o": H2OCache,
}
