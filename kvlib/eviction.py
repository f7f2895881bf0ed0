"""Caches for streams longer than the model's context: keep a budget of tokens, evict the rest.

Layout (as in `kvlib.cache`): keys[layer], values[layer]: (B, K, W, D), W = `budget` slots.
Bookkeeping per slot: token_pos[layer] (B, K, W) int64, the stream index of the token in the
slot; rotated_at[layer] (B, K, W) int64, the RoPE position its key was rotated at when written;
H2O's scores[layer] (B, K, W) fp32, the attention the token has received. Each kv head of each
row may keep different tokens (H2O does), so bookkeeping is per (b, k).

Every cache here implements the cache interface of `kvlib.cache` plus one step of its own:

    make_room(T) -> n_evicted   before a forward pass of T new tokens, evict tokens (all
                                layers at once) so that seq_len + T <= budget

Slots always hold tokens in stream order, the newest last. Policies differ only in which
tokens `make_room` keeps:

    FullCache           never evicts (the reference); overflowing raises CacheFullError
    SlidingWindowCache  the last W tokens
    SinkCache           StreamingLLM (Xiao et al. 2024): the first n_sink tokens (the
                        "attention sinks") + the last W - n_sink
    H2OCache            Heavy-Hitter Oracle (Zhang et al. 2023): the n_recent most recent
                        tokens + the W - n_recent older ones with the largest accumulated
                        attention

Positions. `positions="cache"` (the default, as in StreamingLLM) numbers tokens by their slot:
a key is rotated at read time to the slot it sits in now, and the queries of a step get the
next slots (the Transformer's default positions, seq_len + t), so positions never exceed the
budget and a stream can run forever. The Transformer rotates keys before it caches them, at
the position p they were written at; a key that has moved to slot s is rotated once more by
s - p (RoPE rotations compose: R(s) = R(s - p) R(p)), which equals storing it un-rotated and
rotating it by s at read time. `positions="original"` keeps every token at its stream index:
no re-rotation, and the queries must get their stream index too (`next_positions`, which
`stream_logits` passes to the model). Positions then grow with the stream and stop at the
model's RoPE table (config.max_seq_len): this variant only runs within the context.

H2O needs the attention weights, which the model's attention computes and throws away. Rather
than widen the cache interface, an H2O cache is given the queries: `observe_queries(layer, q)`
takes the rotated queries (B, H, T, D) of the coming update, and `update` then scores the
T new queries against all S keys (softmax in fp32, causal mask bottom-right) and adds the
weights, summed over the G query heads of each kv head and over the T queries, to each
slot's score. The Transformer stays unchanged: `watch_queries(model, cache)` registers
forward hooks on each layer's query projection that rotate its output and hand it to the
cache (`stream_logits` does this). Recomputing q k^T costs one extra (B, H, T, S) score
matrix per layer; nothing in the model's own attention changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch

from kvlib.attention import causal_mask
from kvlib.cache import CacheBase, CacheFullError, KVCacheError
from kvlib.config import ModelConfig, check_int
from kvlib.transformer import Transformer, apply_rope, check_tokens, rope_tables

Positions = Literal["cache", "original"]
POSITIONS = ("cache", "original")


class EvictionCache(CacheBase):
    """A cache of at most `budget` tokens per row; subclasses choose which tokens to keep.

    `max_seq_len` (the capacity the Transformer checks) is the budget. `rope_len` is the
    length of the model's RoPE table (config.max_seq_len) and `rope_theta` its base; they let
    the cache re-rotate keys and, in "original" mode, bound the positions.
    """

    policy = "full"
    needs_queries = False  # True for caches that rank tokens by the attention they receive

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        budget: int,
        *,
        positions: Positions = "cache",
        rope_theta: float = 10000.0,
        rope_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, dtype, device)
        check_int("budget", budget, error=KVCacheError)
        if positions not in POSITIONS:
            raise KVCacheError(f"positions must be one of {POSITIONS}, got {positions!r}")
        rope_len = budget if rope_len is None else rope_len
        if not isinstance(rope_len, int) or isinstance(rope_len, bool) or rope_len < budget:
            raise KVCacheError(
                f"rope_len (the model's RoPE table, config.max_seq_len) must be an int >= "
                f"budget={budget}: slot positions run up to budget - 1; got {rope_len!r}"
            )
        self.budget = budget
        self.max_seq_len = budget  # the capacity Transformer._check_cache reads
        self.positions = positions
        self.rope_len = rope_len
        B, K, W, D = batch_size, n_kv_heads, budget, head_dim
        dev = self.device
        self.keys = [torch.zeros(B, K, W, D, dtype=dtype, device=dev) for _ in range(n_layers)]
        self.values = [torch.zeros(B, K, W, D, dtype=dtype, device=dev) for _ in range(n_layers)]
        long = dict(dtype=torch.long, device=dev)
        self.token_pos = [torch.zeros(B, K, W, **long) for _ in range(n_layers)]  # stream index
        self.rotated_at = [torch.zeros(B, K, W, **long) for _ in range(n_layers)]  # RoPE pos
        self._seen = [0] * n_layers  # tokens streamed through each layer, ever
        self._moved = [False] * n_layers  # has any key left the slot it was written to?
        self.n_evicted = 0  # tokens evicted per row (and kv head), ever
        self.rope_cos, self.rope_sin = rope_tables(D, rope_len, rope_theta, dev)  # (R, D) fp32

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        budget: int,
        batch_size: int = 1,
        *,
        positions: Positions = "cache",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **policy_args,
    ) -> EvictionCache:
        """A cache of `budget` tokens shaped for `config` (policy arguments by keyword)."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget > config.max_seq_len:
            raise KVCacheError(
                f"budget must be an int <= config.max_seq_len={config.max_seq_len} (slot "
                f"positions must stay inside the RoPE table), got {budget!r}"
            )
        return cls(
            config.n_layers,
            batch_size,
            config.n_kv_heads,
            config.head_dim,
            budget,
            positions=positions,
            rope_theta=config.rope_theta,
            rope_len=config.max_seq_len,
            dtype=dtype,
            device=device,
            **policy_args,
        )

    # ---- positions -----------------------------------------------------------------------------
    @property
    def n_seen(self) -> int:
        """Tokens streamed through the cache so far (kept or evicted)."""
        return min(self._seen)

    def _write_positions(self, layer: int, T: int) -> torch.Tensor:
        """(T,) RoPE positions of the next T tokens of `layer`: slots, or stream indices."""
        first = self._len[layer] if self.positions == "cache" else self._seen[layer]
        if first + T > self.rope_len:
            raise KVCacheError(
                f"positions {first}..{first + T - 1} run past the model's RoPE table "
                f"({self.rope_len} positions): with positions='original' a stream must fit in "
                "the context; use positions='cache' for longer streams"
            )
        return torch.arange(first, first + T, device=self.device)  # (T,)

    def next_positions(self, T: int) -> torch.Tensor:
        """(B, T) positions to pass as the model's position_ids for the next T tokens."""
        check_int("T", T, 1)
        pos = self._write_positions(0, T)  # (T,)
        return pos[None, :].expand(self.batch_size, T)  # (B, T)

    def kept_positions(self, layer: int = 0) -> torch.Tensor:
        """(B, K, S) stream indices of the tokens `layer` holds, in slot order."""
        self._check_layer(layer)
        return self.token_pos[layer][:, :, : self._len[layer]].clone()

    # ---- the cache interface -------------------------------------------------------------------
    def set_left_padding(self, n_pad: torch.Tensor) -> None:
        """Streams have no padding: only all-zero n_pad is accepted."""
        n_pad = torch.as_tensor(n_pad)
        if bool((n_pad != 0).any()):
            raise KVCacheError(
                f"{type(self).__name__} holds unpadded streams of equal length; got left "
                f"padding {n_pad.tolist()} (run rows of different lengths one at a time)"
            )
        super().set_left_padding(n_pad)

    def _before_update(self, layer: int, T: int) -> None:
        """Policy checks that must pass before anything is written (H2O: the queries)."""

    def _after_update(self, layer: int, k_all: torch.Tensor) -> None:
        """Policy bookkeeping once the T new tokens are in (H2O: accumulate attention)."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return its (B, K, S, D) keys (rotated to their
        current positions) and values. Call `make_room(T)` first when the cache may be full."""
        T = self._check_kv(layer, k, v, self.budget)
        written = self._write_positions(layer, T)  # (T,) may raise: nothing written yet
        self._before_update(layer, T)
        n, seen = self._len[layer], self._seen[layer]
        self.keys[layer][:, :, n : n + T] = k
        self.values[layer][:, :, n : n + T] = v
        self.token_pos[layer][:, :, n : n + T] = torch.arange(seen, seen + T, device=self.device)
        self.rotated_at[layer][:, :, n : n + T] = written
        self._len[layer] = n + T
        self._seen[layer] = seen + T
        self.elements_copied += k.numel() + v.numel()
        k_all = self.read_keys(layer)  # (B, K, S, D)
        self._after_update(layer, k_all)
        return k_all, self.values[layer][:, :, : n + T]

    def read_keys(self, layer: int) -> torch.Tensor:
        """(B, K, S, D) keys of `layer` as attention must see them.

        positions='cache': a key written at RoPE position p that now sits in slot s is rotated
        by s - p <= 0 (in fp32, cast back). Until a key has moved this is the stored tensor.
        """
        self._check_layer(layer)
        S = self._len[layer]
        k = self.keys[layer][:, :, :S]  # (B, K, S, D)
        if self.positions == "original" or not self._moved[layer]:
            return k
        slots = torch.arange(S, device=self.device)  # (S,)
        delta = slots - self.rotated_at[layer][:, :, :S]  # (B, K, S), <= 0
        cos = self.rope_cos[delta.abs()]  # (B, K, S, D) cos is even
        sin = self.rope_sin[delta.abs()] * delta.sign()[..., None]  # (B, K, S, D) sin is odd
        return apply_rope(k.float(), cos, sin).to(k.dtype)  # (B, K, S, D)

    def crop(self, n: int) -> None:
        """Keep the first n slots of every layer (the n_seen - n dropped are the newest)."""
        before = list(self._len)
        super().crop(n)  # validates n
        self._seen = [s - (b - n) for s, b in zip(self._seen, before, strict=True)]

    def reset(self) -> None:
        """Forget every token (the buffers are kept)."""
        super().reset()
        self._seen = [0] * self.n_layers
        self._moved = [False] * self.n_layers
        self.n_evicted = 0

    # ---- eviction ------------------------------------------------------------------------------
    def _check_room(self, T: int) -> None:
        """Policy limits on T (raise before anything changes)."""
        if T > self.budget:
            raise ValueError(
                f"{T} new tokens cannot fit a budget of {self.budget}: feed at most "
                f"{self.budget} at a time"
            )

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        """(B, K, m) ascending slots of `layer` to keep, of the n it holds."""
        raise NotImplementedError

    def make_room(self, T: int) -> int:
        """Evict tokens so that T new ones fit the budget; return how many were evicted."""
        check_int("T", T, 1)
        if len(set(self._len)) != 1:
            raise KVCacheError(
                f"layers hold different lengths {self._len}: make room between forward passes"
            )
        n = self.seq_len
        if n + T <= self.budget:
            return 0
        self._check_room(T)
        m = self.budget - T  # tokens kept
        keep = [self._keep(layer, n, m, T) for layer in range(self.n_layers)]  # (B, K, m) each
        for layer, idx in enumerate(keep):
            self._compact(layer, idx, n)
            self._len[layer] = m
            self._moved[layer] = True
        self.n_evicted += n - m
        return n - m

    def _buffers(self, layer: int) -> list[torch.Tensor]:
        """The per-slot tensors of `layer` that eviction compacts."""
        return [self.keys[layer], self.values[layer], self.token_pos[layer], self.rotated_at[layer]]

    def _compact(self, layer: int, idx: torch.Tensor, n: int) -> None:
        """Move the slots idx (B, K, m) to slots [0, m), in order."""
        m = idx.shape[2]
        for buf in self._buffers(layer):
            src = buf[:, :, :n]  # (B, K, n) or (B, K, n, D)
            gather_idx = idx if buf.ndim == 3 else idx[..., None].expand(-1, -1, -1, buf.shape[3])
            buf[:, :, :m] = torch.gather(src, 2, gather_idx)  # gather copies before the write

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(L={self.n_layers}, B={self.batch_size}, "
            f"K={self.n_kv_heads}, budget={self.budget}, D={self.head_dim}, "
            f"positions={self.positions!r}, seq_len={self.seq_len}, n_seen={self.n_seen})"
        )


class FullCache(EvictionCache):
    """The reference: keeps every token; `make_room` raises CacheFullError past the budget."""

    policy = "full"

    def make_room(self, T: int) -> int:
        check_int("T", T, 1)
        if self.seq_len + T > self.budget:
            raise CacheFullError(
                f"a full cache never evicts: it holds {self.seq_len} of {self.budget} tokens "
                f"and {T} more would overflow it (use an evicting cache for longer streams)"
            )
        return 0


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
        if not isinstance(n_sink, int) or isinstance(n_sink, bool) or n_sink < 0:
            raise KVCacheError(f"n_sink must be an int >= 0, got {n_sink!r}")
        if n_sink >= self.budget:
            raise KVCacheError(
                f"n_sink={n_sink} leaves no room for recent tokens in a budget of {self.budget}: "
                "need n_sink < budget"
            )
        self.n_sink = n_sink

    def _check_room(self, T: int) -> None:
        if T > self.budget - self.n_sink:
            raise ValueError(
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
    of its kv head and over every query since it arrived). Needs the queries: run the model
    inside `watch_queries(model, cache)` (or call `observe_queries` before each update).
    """

    policy = "h2o"
    needs_queries = True

    def __init__(self, *args, n_recent: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n_recent = self.budget // 2 if n_recent is None else n_recent
        if not isinstance(n_recent, int) or isinstance(n_recent, bool):
            raise KVCacheError(f"n_recent must be an int, got {n_recent!r}")
        if not 0 <= n_recent <= self.budget:
            raise KVCacheError(f"n_recent must be in [0, budget={self.budget}], got {n_recent}")
        self.n_recent = n_recent
        B, K, W = self.batch_size, self.n_kv_heads, self.budget
        self.scores = [
            torch.zeros(B, K, W, dtype=torch.float32, device=self.device)
            for _ in range(self.n_layers)
        ]
        self._queries: list[torch.Tensor | None] = [None] * self.n_layers

    def observe_queries(self, layer: int, q: torch.Tensor) -> None:
        """Give the rotated queries (B, H, T, D) of the next `update` of `layer`."""
        self._check_layer(layer)
        if not isinstance(q, torch.Tensor):
            raise KVCacheError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if (
            q.ndim != 4
            or q.shape[0] != self.batch_size
            or q.shape[1] % self.n_kv_heads
            or q.shape[3] != self.head_dim
        ):
            raise KVCacheError(
                f"q must have shape (B={self.batch_size}, H, T, D={self.head_dim}) with H a "
                f"multiple of K={self.n_kv_heads}, got {tuple(q.shape)}"
            )
        self._queries[layer] = q

    def _before_update(self, layer: int, T: int) -> None:
        q = self._queries[layer]
        if q is None:
            raise KVCacheError(
                f"H2OCache ranks tokens by the attention they receive and has no queries for "
                f"layer {layer}: run the model inside `with watch_queries(model, cache):` "
                "(stream_logits does) or call observe_queries(layer, q) before update"
            )
        if q.shape[2] != T:
            raise KVCacheError(
                f"the observed queries hold {q.shape[2]} tokens, the update {T}: observe the "
                "queries of the same forward pass"
            )

    def _after_update(self, layer: int, k_all: torch.Tensor) -> None:
        q = self._queries[layer]
        self._queries[layer] = None
        S = k_all.shape[2]
        T = q.shape[2]
        self.scores[layer][:, :, S - T : S] = 0.0
        self.scores[layer][:, :, :S] += attention_received(q, k_all)  # (B, K, S)

    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        r = min(max(self.n_recent - T, 0), m)  # recent tokens kept from the cache
        h = m - r  # heavy hitters kept from the older n - r
        recent = torch.arange(n - r, n, device=self.device)  # (r,)
        recent = recent.expand(self.batch_size, self.n_kv_heads, r)  # (B, K, r)
        older = self.scores[layer][:, :, : n - r]  # (B, K, n - r)
        heavy = older.topk(h, dim=-1).indices.sort(dim=-1).values  # (B, K, h)
        return torch.cat([heavy, recent], dim=-1)  # (B, K, m)

    def _buffers(self, layer: int) -> list[torch.Tensor]:
        return super()._buffers(layer) + [self.scores[layer]]

    def crop(self, n: int) -> None:
        super().crop(n)
        self._queries = [None] * self.n_layers

    def reset(self) -> None:
        super().reset()
        self._queries = [None] * self.n_layers

    @property
    def nbytes_allocated(self) -> int:
        return super().nbytes_allocated + sum(s.numel() * s.element_size() for s in self.scores)


POLICIES: dict[str, type[EvictionCache]] = {
    "full": FullCache,
    "window": SlidingWindowCache,
    "sinks": SinkCache,
    "h2o": H2OCache,
}


# ---- attention scores and the query hook ----------------------------------------------------


def attention_received(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, K, S): attention each of the S keys gets from the T queries (the last T of S).

    q: (B, H, T, D) rotated queries, k: (B, K, S, D) rotated keys. Softmax over the causal,
    bottom-right-aligned scores in fp32 (fp64 for fp64 inputs), summed over the G query heads
    of each kv head and over the T queries. Each query spreads 1 over the keys, so the
    scores of a kv head sum to G * T.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    qg = q.to(acc).reshape(B, K, G * T, D)  # (B, K, G*T, D): a group's queries as rows
    scores = (qg @ k.to(acc).transpose(-1, -2)) / math.sqrt(D)  # (B, K, G*T, S)
    scores = scores.reshape(B, K, G, T, S)  # (B, K, G, T, S)
    mask = causal_mask(T, S, device=q.device)  # (T, S)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B,K,G,T,S)
    return weights.sum(dim=(2, 3))  # (B, K, S)


@contextlib.contextmanager
def watch_queries(model: Transformer, cache: EvictionCache) -> Iterator[None]:
    """While active, every layer's query projection hands its rotated queries to `cache`.

    A forward hook on layer i's `attn.wq` reshapes its output (B, T, H*D) to (B, H, T, D),
    rotates it at the positions the cache will write the T tokens at, and calls
    `cache.observe_queries(i, q)`. A no-op for caches that do not need queries.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    if not getattr(cache, "needs_queries", False):
        yield
        return
    H, D = model.config.n_heads, model.config.head_dim

    def hook_for(layer: int):
        def hook(module, inputs, out: torch.Tensor) -> None:
            B, T, _ = out.shape
            q = out.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            pos = cache._write_positions(layer, T)  # (T,)
            cos, sin = cache.rope_cos[pos], cache.rope_sin[pos]  # (T, D) fp32
            cache.observe_queries(layer, apply_rope(q.float(), cos, sin))

        return hook

    handles = [blk.attn.wq.register_forward_hook(hook_for(i)) for i, blk in enumerate(model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- streaming -----------------------------------------------------------------------------


@torch.inference_mode()
def stream_logits(
    model: Transformer,
    tokens: torch.Tensor,
    cache: EvictionCache,
    *,
    prefill: int | None = None,
) -> torch.Tensor:
    """Run a stream (B, N) through `model` with `cache`; return the logits (B, N, V) fp32.

    The first `prefill` tokens (default: as many as the budget holds, at most N) go in one
    forward pass; after that one token per step, each preceded by `cache.make_room(1)`.
    Positions come from `cache.next_positions`, so both position modes work.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    if not isinstance(cache, EvictionCache):
        raise TypeError(f"cache must be a kvlib.eviction cache, got {type(cache).__name__}")
    check_tokens(tokens, model.config.vocab_size)  # (B, N): the whole stream
    B, N = tokens.shape
    first = max(1, min(N, cache.budget - cache.seq_len)) if prefill is None else prefill
    check_int("prefill", first, 1)
    if first > N:
        raise ValueError(f"prefill={first} is longer than the stream of {N} tokens")
    out = torch.empty(B, N, model.config.vocab_size, dtype=torch.float32, device=model.device)
    with watch_queries(model, cache):
        i = 0
        while i < N:
            T = first if i == 0 else 1
            cache.make_room(T)
            pos = cache.next_positions(T)  # (B, T)
            out[:, i : i + T] = model(tokens[:, i : i + T], cache, position_ids=pos).float()
            i += T
    return out
