"""Caches for streams longer than the model's context: keep a budget of tokens, evict the rest.

Layout (as in `kvlib.cache`): keys[layer], values[layer]: (B, K, W, D), W = `budget` slots.
Bookkeeping per slot: token_pos[layer] (B, K, W) int64, the stream index of the token in the
slot; rotated_at[layer] (B, K, W) int64, the RoPE position its key was rotated at when written;
H2O's scores[layer] (B, K, W) fp32, the attention the token has received. Each kv head of each
row may keep different tokens (H2O does), so bookkeeping is per (b, k).

Every cache here implements the interface of `kvlib.cache.Cache`; eviction lives in its
per-step hook:

    prepare(T) -> n_evicted     before a forward pass of T new tokens, evict tokens (all
                                layers at once) so that seq_len + T <= budget

so `kvlib.generate` and any loop over `model(tokens, cache)` drive these caches unchanged.
Slots always hold tokens in stream order, the newest last. The policies
(`kvlib.eviction.policies`: full, sliding window, attention sinks, H2O) differ only in which
tokens `prepare` keeps.

Positions (the `next_positions` hook). `positions="cache"` (the default, as in StreamingLLM)
numbers tokens by their slot: a key is rotated at read time to the slot it sits in now, and
the queries of a step get the next slots, so positions never exceed the budget and a stream
can run forever. The Transformer rotates keys before it caches them, at the position p they
were written at; a key that has moved to slot s is rotated once more by s - p (RoPE rotations
compose: R(s) = R(s - p) R(p)), which equals storing it un-rotated and rotating it by s at
read time. `positions="original"` keeps every token at its stream index: no re-rotation, and
the queries get their stream index too. Positions then grow with the stream and stop at the
model's RoPE table (config.max_seq_len): this variant only runs within the context.

H2O needs the attention weights, which it computes itself: it overrides `attend`, the one
call the model makes per layer, which receives the rotated queries (B, H, T, D). After storing
the T new tokens it scores the T queries against all S keys (softmax in fp32, causal mask
bottom-right) and adds the weights, summed over the G query heads of each kv head and over the
T queries, to each slot's score. Recomputing q k^T costs one extra (B, H, T, S) score matrix
per layer; the attention itself is the interface's default.

Undo. Eviction builds the compacted buffers as new tensors and a step writes only past the
slots it started with, so `checkpoint` keeps references to the buffers and `rollback` puts
them back: a step that fails after evicting changes nothing.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch

from kvlib.attention import causal_mask, grouped_weights
from kvlib.cache import Cache
from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, KVLibTypeError, KVLibValueError, check_int
from kvlib.rope import apply_rope, rope_tables

Positions = Literal["cache", "original"]
POSITIONS = ("cache", "original")


class EvictionCache(Cache):
    """A cache of at most `budget` tokens per row; subclasses choose which tokens to keep.

    `capacity` is the budget. `rope_len` is the length of the model's RoPE table
    (config.max_seq_len) and `rope_theta` its base; they let the cache re-rotate keys and, in
    "original" mode, bound the positions.
    """

    policy = "full"

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
        # slot positions run up to budget - 1, inside the model's RoPE table (config.max_seq_len)
        check_int("rope_len", rope_len, low=budget, error=KVCacheError)
        self.budget = budget
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
        # (rope_len, D) fp32 each
        self.rope_cos, self.rope_sin = rope_tables(D, rope_len, rope_theta, dev)

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
            raise KVLibTypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
        # slot positions must stay inside the RoPE table: budget <= config.max_seq_len
        check_int("budget", budget, high=config.max_seq_len, error=KVCacheError)
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
    def capacity(self) -> int:
        return self.budget

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
        """(B, T) RoPE positions of the next T tokens (after `prepare(T)`): the next slots, or
        the next stream indices with positions='original'."""
        check_int("T", T, 1, error=KVCacheError)
        pos = self._write_positions(0, T)  # (T,)
        return pos[None, :].expand(self.batch_size, T)  # (B, T)

    def max_position(self, n: int) -> int:
        """Slots stay below the budget; stream indices grow with the stream."""
        if self.positions == "cache":
            return min(self.seq_len + n, self.budget) - 1
        return self.n_seen + n - 1

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

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return its (B, K, S, D) keys (rotated to their
        current positions) and values. Call `prepare(T)` first when the cache may be full."""
        return self._append(layer, k, v)

    def _append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = self._check_kv(layer, k, v, self.budget)
        written = self._write_positions(layer, T)  # (T,) may raise: nothing written yet
        n, seen = self._len[layer], self._seen[layer]
        self.keys[layer][:, :, n : n + T] = k
        self.values[layer][:, :, n : n + T] = v
        self.token_pos[layer][:, :, n : n + T] = torch.arange(seen, seen + T, device=self.device)
        self.rotated_at[layer][:, :, n : n + T] = written
        self._len[layer] = n + T
        self._seen[layer] = seen + T
        self.elements_copied += k.numel() + v.numel()
        return self.read_keys(layer), self.values[layer][:, :, : n + T]  # (B, K, S, D) each

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

    def checkpoint(self) -> dict:
        return super().checkpoint() | {
            "seen": list(self._seen),
            "moved": list(self._moved),
            "n_evicted": self.n_evicted,
            "buffers": [list(buffers) for buffers in self._buffer_lists()],
        }

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        self._seen, self._moved = list(state["seen"]), list(state["moved"])
        self.n_evicted = state["n_evicted"]
        for buffers, saved in zip(self._buffer_lists(), state["buffers"], strict=True):
            buffers[:] = saved

    def reset(self) -> None:
        """Forget every token (the buffers are kept)."""
        super().reset()
        self._seen = [0] * self.n_layers
        self._moved = [False] * self.n_layers
        self.n_evicted = 0

    # ---- eviction ------------------------------------------------------------------------------
    def check_room(self, n: int) -> None:
        """An evicting cache makes room for any number of tokens, a step at a time."""
        check_int("n", n, 0, error=KVCacheError)

    def _check_room(self, T: int) -> None:
        """Policy limits on the T tokens of one step (raise before anything changes)."""
        if T > self.budget:
            raise KVLibValueError(
                f"{T} new tokens cannot fit a budget of {self.budget}: feed at most "
                f"{self.budget} at a time"
            )

    @abstractmethod
    def _keep(self, layer: int, n: int, m: int, T: int) -> torch.Tensor:
        """(B, K, m) ascending slots of `layer` to keep, of the n it holds."""

    def prepare(self, T: int) -> int:
        """Evict tokens so that T new ones fit the budget; return how many were evicted."""
        check_int("T", T, 1, error=KVCacheError)
        self._check_between_steps()
        if self.positions == "original":
            self._write_positions(0, T)  # raises past the RoPE table, before any eviction
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

    def _buffer_lists(self) -> list[list[torch.Tensor]]:
        """The per-layer lists of per-slot tensors that eviction compacts."""
        return [self.keys, self.values, self.token_pos, self.rotated_at]

    def _compact(self, layer: int, idx: torch.Tensor, n: int) -> None:
        """Move the slots idx (B, K, m) to slots [0, m), in order, into new buffers (the old
        ones stay intact for `rollback`)."""
        m = idx.shape[2]
        for buffers in self._buffer_lists():
            buf = buffers[layer]
            src = buf[:, :, :n]  # (B, K, n) or (B, K, n, D)
            gather_idx = idx if buf.ndim == 3 else idx[..., None].expand(-1, -1, -1, buf.shape[3])
            new = torch.zeros_like(buf)
            new[:, :, :m] = torch.gather(src, 2, gather_idx)  # (B, K, m) or (B, K, m, D)
            buffers[layer] = new

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(L={self.n_layers}, B={self.batch_size}, "
            f"K={self.n_kv_heads}, budget={self.budget}, D={self.head_dim}, "
            f"positions={self.positions!r}, seq_len={self.seq_len}, n_seen={self.n_seen})"
        )


# ---- attention scores --------------------------------------------------------------------------


def attention_received(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, K, S): attention each of the S keys gets from the T queries (the last T of S).

    q: (B, H, T, D) rotated queries, k: (B, K, S, D) rotated keys. Softmax over the causal,
    bottom-right-aligned scores in fp32 (fp64 for fp64 inputs), summed over the G query heads
    of each kv head and over the T queries. Each query spreads 1 over the keys, so the
    scores of a kv head sum to G * T.
    """
    T, S = q.shape[2], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    mask = causal_mask(T, S, device=q.device)  # (T, S)
    weights = grouped_weights(q.to(acc), k.to(acc), mask)  # (B, K, G, T, S)
    return weights.sum(dim=(2, 3))  # (B, K, S)
