"""The cache interface every kvlib cache implements.

Layout, used everywhere in kvlib (the paged and quantized caches present the same view):

    keys[layer], values[layer]: (B, K, S_max, D)

Slots [0, seq_len) of every row are written. Row b holds its real tokens in slots
[start[b], seq_len): with left padding (chapter 4) the first start[b] slots of a row are
padding and are masked out of attention. `lengths[b] = seq_len - start[b]` real tokens.

`Cache` is the one interface (the plainest caches that implement it, `KVCache` and
`ConcatKVCache`, are in `kvlib.kv_cache`). `kvlib.Transformer` and `kvlib.generate` read only
what it declares, so they run unchanged on every cache (contiguous, concat, paged, quantized,
sliding window, sinks, H2O):

    sizes        n_layers, batch_size, n_kv_heads, head_dim, dtype, device, capacity
    lengths      seq_len, layer_len(layer), lengths, start, valid_mask(S)
    padding      set_left_padding(n_pad)                   before the first write
    one step     check_room(n) -> None                     raise unless n more tokens fit
                 prepare(T) -> int                          make room for T tokens (evict)
                 next_positions(T) -> (B, T)                RoPE positions of T new tokens
                 attend(layer, q, k, v, mask) -> (B, H, T, D)
                     the one call per layer: store k, v (B, K, T, D), attend q (B, H, T, D)
                     over the layer's history; the default is update(), then `attention`
                 update(layer, k, v) -> (k_all, v_all)     store; return (B, K, S, D) views
    undo         checkpoint() -> state, rollback(state)     a failed step changes nothing
                 crop(n), reset()
    memory       nbytes_allocated, nbytes_used

A cache with a faster read (paged: blocks read in place), or one that needs the queries (H2O:
it scores tokens by the attention they receive) overrides `attend`; an evicting cache
overrides `prepare` and `next_positions`. Every public method validates its input before it writes,
so a failed call leaves the cache as it was; a model forward that fails in a later layer rolls
back to the checkpoint it took first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvlib.attention import grouped_attention, real_slots
from kvlib.config import ModelConfig, dtype_bytes
from kvlib.errors import CacheFullError, KVCacheError, KVLibIndexError, KVLibTypeError, check_int

# The interface's public members, in the order the module docstring lists them.
INTERFACE = (
    "capacity",
    "seq_len",
    "layer_len",
    "lengths",
    "start",
    "valid_mask",
    "set_left_padding",
    "check_room",
    "prepare",
    "next_positions",
    "max_position",
    "attend",
    "update",
    "checkpoint",
    "rollback",
    "crop",
    "reset",
    "nbytes_allocated",
    "nbytes_used",
)


def overrides(cls: type) -> list[str]:
    """The members of the `Cache` interface that the cache class `cls` defines itself
    (directly or through a parent other than `Cache`); the others are `Cache`'s defaults."""
    if not (isinstance(cls, type) and issubclass(cls, Cache)):
        raise KVLibTypeError(f"expected a kvlib cache class (a subclass of Cache), got {cls!r}")
    return [name for name in INTERFACE if getattr(cls, name) is not getattr(Cache, name)]


def position_ids(start: torch.Tensor, seq_len_before: int, T: int) -> torch.Tensor:
    """(B, T) RoPE positions of T new tokens after `seq_len_before` slots.

    pos[b, t] = seq_len_before + t - start[b], clamped at 0 (padding slots get position 0),
    so a left-padded row's real tokens are numbered 0, 1, ... as if the row ran alone.
    """
    slots = torch.arange(seq_len_before, seq_len_before + T, device=start.device)  # (T,)
    return (slots[None, :] - start[:, None]).clamp(min=0)  # (B, T)


class Cache(ABC):
    """The interface of every kvlib cache (see the module docstring), with the state they share.

    A cache variant subclasses it, keeps its per-layer storage and implements `update`; it
    overrides `attend`, `prepare`, `next_positions`, `check_room`, `checkpoint` / `rollback` and
    the memory accounting where its storage needs it.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in (
            ("n_layers", n_layers),
            ("batch_size", batch_size),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
        ):
            check_int(name, value, error=KVCacheError)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise KVCacheError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self._len = [0] * n_layers  # slots written, per layer
        self.elements_copied = 0  # elements written into cache memory by update(), ever
        self._start = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        """Slots a row can hold; None when only a shared pool (paged) or nothing limits it."""
        return None

    # ---- lengths ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Slots written in every layer (during a forward pass, earlier layers run ahead)."""
        return min(self._len)

    def layer_len(self, layer: int) -> int:
        """Slots written in one layer."""
        self._check_layer(layer)
        return self._len[layer]

    @property
    def start(self) -> torch.Tensor:
        """(B,) first slot holding a real token in each row (0 without left padding)."""
        return self._start

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real (non-padding) tokens cached per row."""
        return (self.seq_len - self._start).clamp(min=0)

    def valid_mask(self, S: int) -> torch.Tensor:
        """(B, S) bool: True where slot s of row b holds a real token."""
        return real_slots(self._start, S)  # (B, S)

    def set_left_padding(self, n_pad: torch.Tensor) -> None:
        """Declare that the first n_pad[b] slots of row b will be padding. Empty cache only."""
        if any(self._len):
            raise KVCacheError(
                f"left padding is set before the first write; this cache already holds "
                f"{self.seq_len} tokens (call reset() first)"
            )
        if not isinstance(n_pad, torch.Tensor):
            raise KVCacheError(f"n_pad must be an integer tensor, got {type(n_pad).__name__}")
        if n_pad.shape != (self.batch_size,) or n_pad.dtype.is_floating_point:
            raise KVCacheError(
                f"n_pad must be an integer tensor of shape ({self.batch_size},), "
                f"got {tuple(n_pad.shape)} {n_pad.dtype}"
            )
        if bool((n_pad < 0).any()):
            raise KVCacheError(f"n_pad must be non-negative, got {n_pad.tolist()}")
        if self.capacity is not None and bool((n_pad > self.capacity).any()):
            raise KVCacheError(
                f"n_pad {n_pad.tolist()} runs past the capacity of {self.capacity} slots"
            )
        self._start = n_pad.to(device=self.device, dtype=torch.long).clone()

    # ---- one step: the hooks the model calls ------------------------------------------------
    def check_room(self, n: int) -> None:
        """Raise CacheFullError unless n more tokens fit (over any number of steps)."""
        check_int("n", n, 0, error=KVCacheError)
        if self.capacity is not None and self.seq_len + n > self.capacity:
            raise CacheFullError(
                f"the cache holds {self.seq_len} of {self.capacity} slots; {n} new tokens "
                "would overflow it (allocate a larger cache or crop first)"
            )

    def prepare(self, T: int) -> int:
        """Get ready for a forward pass of T new tokens; return the tokens evicted (0 here).

        Called by the model before the first layer; raises, changing nothing, if T tokens
        cannot be written. An evicting cache makes room here.
        """
        self._check_between_steps()
        self.check_room(T)
        return 0

    def next_positions(self, T: int) -> torch.Tensor:
        """(B, T) RoPE positions of the next T tokens (by default each row counts from 0).

        Each row's real tokens are numbered 0, 1, ... as if the row ran alone (`position_ids`)."""
        check_int("T", T, 1, error=KVCacheError)
        return position_ids(self._start, self.seq_len, T)  # (B, T)

    def max_position(self, n: int) -> int:
        """The largest RoPE position the next n tokens can get (checked before a run)."""
        return self.seq_len + n - 1

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The model's one call per layer: store k, v, return q's attention over the history.

        k, v: (B, K, T, D) new keys and values of `layer`; q: (B, H, T, D) their queries;
        mask: None (every slot visible) or bool, broadcastable to (B, 1, T, S). Returns
        (B, H, T, D). The default: `update`, then grouped attention (fp32 softmax) in q's
        dtype. k and v are stored in the cache's dtype (a bf16 cache under an fp32 model
        rounds them).
        """
        self._check_q(q, k)
        k_all, v_all = self.update(layer, k.to(self.dtype), v.to(self.dtype))  # (B, K, S, D)
        return grouped_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), mask)  # (B, H, T, D)

    @abstractmethod
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return its (B, K, S, D) keys and values."""

    # ---- undo --------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The state a failed step rolls back to (taken by the model before each forward).

        Writes after it land in slots past the checkpoint's lengths (or in fresh tensors), so
        lengths and bookkeeping suffice."""
        return {
            "len": list(self._len),
            "start": self._start.clone(),
            "copied": self.elements_copied,
        }

    def rollback(self, state: dict) -> None:
        """Return to `state` from `checkpoint()`: nothing written since is visible."""
        self._len = list(state["len"])
        self._start = state["start"].clone()
        self.elements_copied = state["copied"]

    def crop(self, n: int) -> None:
        """Keep the first n slots of every layer (roll back rejected speculative tokens)."""
        self._check_between_steps()
        check_int("crop length", n, low=0, high=self.seq_len, error=KVCacheError)
        self._len = [n] * self.n_layers
        # a row cropped into its padding holds no real token; its next token starts at slot n
        self._start = self._start.clamp(max=n)

    def reset(self) -> None:
        """Forget every token and any padding (the buffers are kept for reuse)."""
        self._len = [0] * self.n_layers
        self._start = torch.zeros_like(self._start)

    # ---- checks ------------------------------------------------------------------------------
    def check_config(self, config: ModelConfig) -> None:
        """Raise unless this cache is shaped for a model with `config`."""
        for name, got, want in (
            ("n_layers", self.n_layers, config.n_layers),
            ("n_kv_heads", self.n_kv_heads, config.n_kv_heads),
            ("head_dim", self.head_dim, config.head_dim),
        ):
            if got != want:
                raise KVCacheError(f"cache has {name}={got}, the model needs {want}")

    def _check_between_steps(self) -> None:
        if len(set(self._len)) != 1:
            raise KVCacheError(
                f"layers hold different lengths {self._len}: a forward pass is mid-step; "
                "finish it first"
            )

    def _check_q(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise unless q (B, H, T, D) fits this cache and the T new tokens of k."""
        T = k.shape[2] if isinstance(k, torch.Tensor) and k.ndim == 4 else "T"
        if (
            not isinstance(q, torch.Tensor)
            or not q.dtype.is_floating_point
            or q.ndim != 4
            or q.shape[0] != self.batch_size
            or q.shape[1] % self.n_kv_heads
            or q.shape[2] != T
            or q.shape[3] != self.head_dim
        ):
            raise KVCacheError(
                f"q must be a float tensor of shape (B={self.batch_size}, H, T={T}, "
                f"D={self.head_dim}) with H a multiple of K={self.n_kv_heads}, got "
                f"{tuple(getattr(q, 'shape', ()))}"
            )

    def _check_layer(self, layer: int) -> None:
        check_int("layer", layer, low=None)
        if not 0 <= layer < self.n_layers:
            raise KVLibIndexError(
                f"layer {layer} out of range for a cache of {self.n_layers} layers"
            )

    def _check_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, capacity: int | None) -> int:
        """Validate one update; return T, the number of new tokens."""
        self._check_layer(layer)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise KVCacheError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if (
                x.ndim != 4
                or x.shape[0] != self.batch_size
                or x.shape[1] != self.n_kv_heads
                or x.shape[3] != self.head_dim
            ):
                raise KVCacheError(
                    f"{name} must have shape (B={self.batch_size}, K={self.n_kv_heads}, T, "
                    f"D={self.head_dim}), got {tuple(x.shape)}"
                )
            if x.dtype != self.dtype:
                raise KVCacheError(f"{name} has dtype {x.dtype}, the cache holds {self.dtype}")
            if x.device != self.device:
                raise KVCacheError(f"{name} is on {x.device}, the cache is on {self.device}")
        if k.shape != v.shape:
            raise KVCacheError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        T = k.shape[2]
        if T == 0:
            raise KVCacheError("update with zero new tokens")
        if capacity is not None and self._len[layer] + T > capacity:
            raise CacheFullError(
                f"layer {layer} holds {self._len[layer]} of {capacity} slots; "
                f"appending {T} more would overflow (make a larger cache or crop first)"
            )
        if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
            raise KVCacheError(
                f"layer {layer}: k or v holds nan or inf; a cache stores finite values only "
                "(nothing was written)"
            )
        return T

    def _token_bytes(self) -> int:
        """Bytes of K and V for one token in one row, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes(self.dtype)

    @property
    def nbytes_allocated(self) -> int:
        """Bytes reserved by the buffers, whether or not they hold tokens."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def nbytes_used(self) -> int:
        """Bytes holding real tokens (padding slots excluded)."""
        return int(self.lengths.sum()) * self._token_bytes()
