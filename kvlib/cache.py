"""The contiguous KV cache: preallocated buffers, explicit lengths, O(1) append.

Layout, used everywhere in kvlib (the paged and quantized caches present the same view):

    keys[layer], values[layer]: (B, K, S_max, D)

Slots [0, seq_len) of every row are written. Row b holds its real tokens in slots
[start[b], seq_len): with left padding (chapter 4) the first start[b] slots of a row are
padding and are masked out of attention. `lengths[b] = seq_len - start[b]` real tokens.

The cache interface every cache variant implements (so `Transformer` runs on any of them):

    update(layer, k, v) -> (k_all, v_all)   write T new tokens of one layer, return (B, K, S, D)
    seq_len, lengths, start                  slots written; real tokens per row; first real slot
    valid_mask(S) -> (B, S) bool             which of the first S slots hold real tokens
    set_left_padding(n_pad)                  declare left padding before the first write
    crop(n), reset()                         roll back to n slots; empty the cache
    nbytes_allocated, nbytes_used            memory accounting

Every method validates its input before touching the buffers, so a failed call leaves the
cache as it was.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from kvlib.config import ModelConfig, check_int, dtype_bytes


class KVCacheError(ValueError):
    """Misuse of a KV cache: wrong shape, dtype or device, or a length out of range."""


class CacheFullError(KVCacheError):
    """Appending would go past the cache's preallocated capacity."""


@runtime_checkable
class Cache(Protocol):
    """What `kvlib.Transformer` needs from a cache (see the module docstring)."""

    n_layers: int
    batch_size: int

    @property
    def seq_len(self) -> int: ...

    @property
    def start(self) -> torch.Tensor: ...

    @property
    def lengths(self) -> torch.Tensor: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def valid_mask(self, S: int) -> torch.Tensor: ...

    def set_left_padding(self, n_pad: torch.Tensor) -> None: ...

    def crop(self, n: int) -> None: ...

    def reset(self) -> None: ...


class CacheBase:
    """What every kvlib cache shares: lengths, left padding, input checks, memory accounting.

    A cache variant subclasses it, keeps its per-layer storage, and implements `update` (and
    `nbytes_allocated` when its storage is not plain `keys` / `values` lists of tensors).
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
        slots = torch.arange(S, device=self.device)  # (S,)
        return slots[None, :] >= self._start[:, None]  # (B, S)

    def set_left_padding(self, n_pad: torch.Tensor) -> None:
        """Declare that the first n_pad[b] slots of row b will be padding. Empty cache only."""
        if any(self._len):
            raise KVCacheError(
                f"left padding is set before the first write; this cache already holds "
                f"{self.seq_len} tokens (call reset() first)"
            )
        n_pad = torch.as_tensor(n_pad)
        if n_pad.shape != (self.batch_size,) or n_pad.dtype.is_floating_point:
            raise KVCacheError(
                f"n_pad must be an integer tensor of shape ({self.batch_size},), "
                f"got {tuple(n_pad.shape)} {n_pad.dtype}"
            )
        if bool((n_pad < 0).any()):
            raise KVCacheError(f"n_pad must be non-negative, got {n_pad.tolist()}")
        self._start = n_pad.to(device=self.device, dtype=torch.long).clone()

    def crop(self, n: int) -> None:
        """Keep the first n slots of every layer (roll back rejected speculative tokens)."""
        if len(set(self._len)) != 1:
            raise KVCacheError(f"layers hold different lengths {self._len}; cannot crop mid-step")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.seq_len:
            raise KVCacheError(f"crop length must be an int in [0, {self.seq_len}], got {n!r}")
        self._len = [n] * self.n_layers
        # a row cropped into its padding holds no real token; its next token starts at slot n
        self._start = self._start.clamp(max=n)

    def reset(self) -> None:
        """Forget every token and any padding (the buffers are kept for reuse)."""
        self._len = [0] * self.n_layers
        self._start = torch.zeros_like(self._start)

    # ---- checks ------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.n_layers} layers")

    def _check_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, capacity: int) -> int:
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
        if self._len[layer] + T > capacity:
            raise CacheFullError(
                f"layer {layer} holds {self._len[layer]} of {capacity} slots; "
                f"appending {T} more would overflow (make a larger cache or crop first)"
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


class KVCache(CacheBase):
    """Preallocated contiguous cache: one (B, K, S_max, D) buffer per layer for K and for V.

    `update` copies T new tokens into the next free slots (O(T) work, no reallocation) and
    returns views of everything written so far.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, dtype, device)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, error=KVCacheError)
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, K, S_max, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """A cache shaped for `config` (capacity defaults to config.max_seq_len)."""
        return cls(
            config.n_layers,
            batch_size,
            config.n_kv_heads,
            config.head_dim,
            max_seq_len or config.max_seq_len,
            dtype=dtype,
            device=device,
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) to `layer`; return that layer's (B, K, S, D) views."""
        T = self._check_kv(layer, k, v, self.max_seq_len)
        pos = self._len[layer]
        self.keys[layer][:, :, pos : pos + T] = k
        self.values[layer][:, :, pos : pos + T] = v
        self._len[layer] = pos + T
        self.elements_copied += k.numel() + v.numel()
        return self.keys[layer][:, :, : pos + T], self.values[layer][:, :, : pos + T]

    def __repr__(self) -> str:
        return (
            f"KVCache(L={self.n_layers}, B={self.batch_size}, K={self.n_kv_heads}, "
            f"S_max={self.max_seq_len}, D={self.head_dim}, dtype={self.dtype}, "
            f"seq_len={self.seq_len})"
        )


class ConcatKVCache(CacheBase):
    """The reference cache: grows by `torch.cat` on every append (a new tensor each step).

    Same interface and results as `KVCache`; each append copies the whole history, so T
    appends cost O(T^2) copying. Chapter 1 measures the difference.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, dtype, device)
        self.max_seq_len = max_seq_len
        empty = (batch_size, n_kv_heads, 0, head_dim)  # (B, K, 0, D)
        self.keys = [torch.zeros(empty, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.values = [torch.zeros(empty, dtype=dtype, device=self.device) for _ in range(n_layers)]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append by concatenation; return the new (B, K, S, D) tensors."""
        self._check_kv(layer, k, v, self.max_seq_len or 2**62)
        pos = self._len[layer]
        self.keys[layer] = torch.cat([self.keys[layer][:, :, :pos], k], dim=2)
        self.values[layer] = torch.cat([self.values[layer][:, :, :pos], v], dim=2)
        self._len[layer] = pos + k.shape[2]
        self.elements_copied += self.keys[layer].numel() + self.values[layer].numel()
        return self.keys[layer], self.values[layer]
