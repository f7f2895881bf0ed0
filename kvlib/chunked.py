"""Chunked prefill and online-softmax attention: never build the whole (T, S) score matrix.

Shapes:
    q: (B, H, T, D)   k, v: (B, K, S, D)   out: (B, H, T, D)   lse: (B, H, T)
    masks: bool, True = may attend, broadcastable to (B, H, T, S)
    tokens: (B, T) int64   logits: (B, T, V), or (B, 1, V) for the last token only

Two ways to cut the (T, S) scores of a prefill into pieces, both exact:

    online_softmax_attention   cut the KEYS into blocks of `block_size`: scores (T, block) at a
                               time, merged by the online-softmax recurrence (a running max m, a
                               running sum l and a rescaled accumulator), as FlashAttention does
                               (Milakov & Gimelshein 2018; Dao et al. 2022)
    chunked_prefill            cut the QUERIES into chunks of `chunk_size` tokens: each chunk runs
                               through the whole model, writes its keys and values to the cache
                               and attends to the cache so far plus itself (scores (chunk, S))

The recurrence, for one query row and key blocks j = 1, 2, ... with scores s_j:

    m_j = max(m_{j-1}, max(s_j))
    l_j = l_{j-1} * exp(m_{j-1} - m_j) + sum(exp(s_j - m_j))
    o_j = o_{j-1} * exp(m_{j-1} - m_j) + exp(s_j - m_j) @ v_j
    out = o_last / l_last,   logsumexp = m_last + log(l_last)

Query token t sits at slot S - T + t (bottom-right causal alignment, as in kvlib.attention).
Scores, the running statistics and the accumulator are fp32 or wider (fp64 stays fp64); the
output is cast back to the input dtype.

`allocation_profile` measures what a call allocates (peak live bytes, largest single tensor),
tensor by tensor, from the torch functions it calls (a public `TorchFunctionMode`), on CPU as
on CUDA.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from kvlib.attention import _acc_dtype, _check_mask, _check_qkv
from kvlib.errors import KVCacheError, KVLibTypeError, KVLibValueError, check_bool, check_int
from kvlib.online_softmax import online_softmax_lse, online_softmax_result, online_softmax_step
from kvlib.transformer import Transformer, check_tokens, pad_lengths

# ---- online-softmax attention ------------------------------------------------------------------


def online_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    block_size: int = 64,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over key blocks of `block_size`, merged by the online-softmax recurrence.

    Same result as `kvlib.attention.attention(q, k, v, mask & causal_mask(T, S))`, but at most a
    (B, H, T, block_size) block of scores exists at a time. `causal=True` applies the
    bottom-right causal mask block by block (no (T, S) mask is built); `mask` may be given too.
    Query rows that may attend to nothing get a zero output (and lse = -inf).

    Returns out (B, H, T, D), and with `return_lse` also the log-sum-exp of each row's scores
    (B, H, T) in the accumulation dtype: what two partial results need to be merged.
    """
    _check_qkv(q, k, v)
    check_int("block_size", block_size)
    check_bool("causal", causal)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    mask = _check_mask(mask, B, H, T, S, q.device)  # (b, h, t, s) or None
    if mask is not None:
        b, h, t, s = mask.shape
        # per-head (b, H, t, s) -> (b, K, G, t, s); shared (b, 1, t, s) -> (b, 1, 1, t, s)
        mask = mask.reshape(b, K, G, t, s) if h == H else mask[:, :, None]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _acc_dtype(q.dtype)

    qg = q.to(acc).reshape(B, K, G * T, D)  # (B, K, G*T, D): a group's queries stacked as rows
    state = None  # the online softmax's running (max, sum, output), see kvlib.online_softmax
    if S == 0:  # no keys: every row sees nothing
        state = (
            torch.full((B, K, G * T, 1), float("-inf"), dtype=acc, device=q.device),
            torch.zeros((B, K, G * T, 1), dtype=acc, device=q.device),
            torch.zeros((B, K, G * T, D), dtype=acc, device=q.device),
        )  # m, l (B, K, G*T, 1); o (B, K, G*T, D)
    q_pos = torch.arange(S - T, S, device=q.device)  # (T,) absolute slot of each query

    for s0 in range(0, S, block_size):
        s1 = min(s0 + block_size, S)
        kb = k[:, :, s0:s1].to(acc)  # (B, K, s, D)
        vb = v[:, :, s0:s1].to(acc)  # (B, K, s, D)
        scores = (qg @ kb.transpose(-1, -2)) * scale  # (B, K, G*T, s)
        scores = scores.reshape(B, K, G, T, s1 - s0)  # (B, K, G, T, s)
        visible = None
        if causal:
            k_pos = torch.arange(s0, s1, device=q.device)  # (s,)
            visible = k_pos[None, :] <= q_pos[:, None]  # (T, s)
        if mask is not None:
            block_mask = mask if mask.shape[-1] == 1 else mask[..., s0:s1]
            visible = block_mask if visible is None else block_mask & visible
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))

        scores = scores.reshape(B, K, G * T, s1 - s0)  # (B, K, G*T, s)
        state = online_softmax_step(state, scores, vb)

    out = online_softmax_result(state).reshape(B, H, T, D).to(q.dtype)  # (B, H, T, D)
    if not return_lse:
        return out
    return out, online_softmax_lse(state).reshape(B, H, T)  # (B, H, T)


# ---- chunked prefill ---------------------------------------------------------------------------


def chunk_bounds(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering [0, n_tokens) in chunks of `chunk_size` (last may be short)."""
    check_int("n_tokens", n_tokens, low=0)
    check_int("chunk_size", chunk_size)
    return [(i, min(i + chunk_size, n_tokens)) for i in range(0, n_tokens, chunk_size)]


@torch.inference_mode()
def chunked_prefill(
    model: Transformer,
    tokens: torch.Tensor,
    cache,
    chunk_size: int,
    *,
    attention_mask: torch.Tensor | None = None,
    all_logits: bool = False,
) -> torch.Tensor:
    """Run the prompt `tokens` (B, T) through `model` `chunk_size` tokens at a time into `cache`.

    Each chunk's queries attend to every slot already cached plus, causally, to the chunk
    itself; the cache ends up holding exactly what one full-prompt forward would write.
    Returns the logits of the last token (B, 1, V), or of every token (B, T, V) with
    `all_logits`. `attention_mask` (B, T) of 0/1 declares left padding (empty cache only).

    Everything is checked before the first chunk runs, and a chunk that fails rolls the cache
    back to its state before the call, so a failed call leaves the cache as it was.
    """
    if not isinstance(model, Transformer):
        raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    check_tokens(tokens, model.config.vocab_size)
    check_int("chunk_size", chunk_size)
    B, T = tokens.shape
    model.check_cache(cache, B, T)
    n_pad = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            raise KVLibValueError(
                f"attention_mask must have the shape of tokens {(B, T)}, "
                f"got {tuple(getattr(attention_mask, 'shape', ()))}"
            )
        if cache.seq_len > 0:
            raise KVCacheError(
                f"attention_mask declares left padding and needs an empty cache; this one "
                f"holds {cache.seq_len} tokens"
            )
        n_pad = pad_lengths(attention_mask)  # (B,), validates the 0/1 pattern

    tokens = tokens.to(model.device)
    outputs = []
    state = cache.checkpoint()
    try:
        if n_pad is not None:
            cache.set_left_padding(n_pad.to(cache.device))
        for start, end in chunk_bounds(T, chunk_size):
            # padding already lives in the cache (start), so the chunks need no attention_mask
            logits = model(tokens[:, start:end], cache, last_only=not all_logits)  # (B, t, V)
            if all_logits or end == T:
                outputs.append(logits)
    except BaseException:
        cache.rollback(state)  # a chunk that fails undoes the chunks before it
        raise
    return torch.cat(outputs, dim=1) if all_logits else outputs[-1]  # (B, T or 1, V)


# ---- measuring memory --------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocationProfile:
    """What one call allocated on one device type, counted tensor by tensor.

    peak_bytes      the most bytes, allocated during the call, that were alive at one moment
    largest_bytes   the largest single allocation
    largest_op      the torch function that made it (e.g. 'matmul', 'softmax', 'zeros')
    n_allocations   how many allocations the call made
    """

    peak_bytes: int
    largest_bytes: int
    largest_op: str
    n_allocations: int


def _tensors(x) -> list[torch.Tensor]:
    """The tensors in x: a tensor, or tuples, lists and dict values of them, nested."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


class _AllocationCounter(TorchFunctionMode):
    """Sees every torch function called inside it (torch.*, F.*, tensor methods and operators,
    factories such as torch.zeros) and counts the memory of the tensors they return.

    A returned tensor whose storage is new (not the storage of an argument, nor one already
    counted) is an allocation of its storage's bytes; the storage is freed when the last tensor
    returned on it is garbage collected (a weakref finalizer on each such tensor). A view of a
    counted storage keeps it alive, a view of an argument or an in-place result allocates
    nothing. Temporaries that a single torch function makes and frees inside itself are not
    seen: the count is of the tensors the Python code creates, which is what the shapes of the
    code predict.
    """

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.refs: dict[int, int] = {}  # storage address -> returned tensors alive on it
        self.sizes: dict[int, int] = {}  # storage address -> bytes
        self.finalizers: list[weakref.finalize] = []
        self.live = self.peak = self.largest = self.n = 0
        self.largest_op = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs or {}))}
        for t in _tensors(out):
            if t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or (ptr in inputs and ptr not in self.refs):
                continue  # nothing allocated, or a view / in-place result of an older tensor
            if ptr not in self.refs:  # new memory
                self.refs[ptr], self.sizes[ptr] = 0, nbytes
                self.live += nbytes
                self.n += 1
                self.peak = max(self.peak, self.live)
                if nbytes > self.largest:
                    self.largest, self.largest_op = nbytes, getattr(func, "__name__", str(func))
            self.refs[ptr] += 1
            self.finalizers.append(weakref.finalize(t, self._release, ptr))
        return out

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= self.sizes.pop(ptr)

    def stop(self) -> None:
        for f in self.finalizers:  # tensors that outlive the call are not followed further
            f.detach()


def allocation_profile(
    fn: Callable[[], object], device: torch.device | str = "cpu"
) -> AllocationProfile:
    """Run `fn()` and count the memory of every tensor it creates on `device`'s type.

    A `torch.overrides.TorchFunctionMode` sees each torch function `fn` calls and the tensors
    it returns; each new storage is an allocation, freed when its last tensor is collected.
    Replaying them in order gives the bytes alive at each moment, whose maximum is the peak.
    Only memory allocated inside `fn` counts (weights and caches made before it are excluded;
    a cache written in place allocates nothing), and so do only the tensors the Python code
    creates: workspace a single torch function uses internally (a BLAS buffer, a fused
    kernel's scratch) is not seen. On a GPU, `torch.cuda.max_memory_allocated` gives the
    allocator's own peak, which includes that workspace.
    """
    if not callable(fn):
        raise KVLibTypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")
    counter = _AllocationCounter(torch.device(device).type)
    try:
        with counter:
            fn()
    finally:
        counter.stop()
    return AllocationProfile(counter.peak, counter.largest, counter.largest_op, counter.n)
