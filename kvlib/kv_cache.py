"""The contiguous caches: `KVCache` (preallocated, O(T) append) and `ConcatKVCache` (torch.cat).

Both implement `kvlib.cache.Cache` in its plainest form, one preallocated or growing tensor per
layer for K and for V:

    keys[layer], values[layer]: (B, K, S_max, D)

`KVCache` writes T new tokens into the next free slots and returns views of everything written
so far; `ConcatKVCache` concatenates, copying the whole history every step (chapter 1's
baseline). Every other cache is measured against `KVCache`.
"""

from __future__ import annotations

import torch

from kvlib.cache import Cache
from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, check_int


class KVCache(Cache):
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
            config.max_seq_len if max_seq_len is None else max_seq_len,
            dtype=dtype,
            device=device,
        )

    @property
    def capacity(self) -> int:
        return self.max_seq_len

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


class ConcatKVCache(Cache):
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
        if max_seq_len is not None:
            check_int("max_seq_len", max_seq_len, error=KVCacheError)
        self.max_seq_len = max_seq_len
        empty = (batch_size, n_kv_heads, 0, head_dim)  # (B, K, 0, D)
        self.keys = [torch.zeros(empty, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.values = [torch.zeros(empty, dtype=dtype, device=self.device) for _ in range(n_layers)]

    @property
    def capacity(self) -> int | None:
        return self.max_seq_len

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append by concatenation; return the new (B, K, S, D) tensors."""
        self._check_kv(layer, k, v, self.max_seq_len)
        pos = self._len[layer]
        self.keys[layer] = torch.cat([self.keys[layer][:, :, :pos], k], dim=2)
        self.values[layer] = torch.cat([self.values[layer][:, :, :pos], v], dim=2)
        self._len[layer] = pos + k.shape[2]
        self.elements_copied += self.keys[layer].numel() + self.values[layer].numel()
        return self.keys[layer], self.values[layer]

    def checkpoint(self) -> dict:
        # every append makes new tensors, so keeping the old ones is enough
        return super().checkpoint() | {"keys": list(self.keys), "values": list(self.values)}

    def rollback(self, state: dict) -> None:
        super().rollback(state)
        self.keys, self.values = list(state["keys"]), list(state["values"])
