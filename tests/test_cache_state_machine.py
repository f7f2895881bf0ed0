"""A model and one cache of each kind through random steps, with failures injected.

Hypothesis drives prefills, decode steps, crops, forks and swaps (paged), evictions (evicting
caches make room on their own) and calls that must fail: a pool or a capacity too small, a
non-finite key in the last layer, a bad shape. After every step the invariants hold; after a
failure nothing changed; and while the cache holds exactly the tokens fed so far, its logits
equal one uncached forward pass over those tokens.
"""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvlib.errors import KVCacheError
from kvlib.paged import PagedKVCache
from kvlib.paged_quant import PagedQuantKVCache
from tests.models import model_for
from tests.test_cache_contract import CONFIG, NAMES, V, evicts, make, observable, tolerance

MODEL = model_for(CONFIG)
BROKEN = model_for(CONFIG)  # the same weights, but the last layer writes a nan key
with torch.no_grad():
    BROKEN.layers[-1].attn.wk.weight[0, 0] = float("nan")
B = 2


def make_small(name):
    """Small enough that overflow, eviction and an exhausted pool all happen."""
    if name == "PagedKVCache":  # 7 blocks of 2 slots for two rows
        return PagedKVCache.from_config(CONFIG, B, num_blocks=7, block_size=2)
    if name.startswith("PagedQuant"):  # the same small pool, quantized
        scheme = "FP8 per-tensor" if name.endswith("FP8") else "int8 per-token"
        return PagedQuantKVCache.from_config(CONFIG, B, num_blocks=7, block_size=2, scheme=scheme)
    return make(name, B=B, S=16)


class CacheMachine(RuleBasedStateMachine):
    @initialize(name=st.sampled_from(NAMES))
    def start(self, name):
        self.name = name
        self.cache = make_small(name)
        self.tokens = torch.zeros(B, 0, dtype=torch.long)  # what the cache holds, in order
        self.exact = True  # the cache holds exactly self.tokens (no eviction since a reset)

    # ---- steps that succeed or fail as a whole --------------------------------------------
    def forward(self, model, x):
        """One forward pass; on failure check that nothing changed and return None."""
        before = observable(self.cache)
        try:
            with torch.no_grad():
                logits = model(x, self.cache)
        except (KVCacheError, ValueError):
            assert observable(self.cache) == before, "a failed forward changed the cache"
            return None
        evicted = self.cache.seq_len < before[0] + x.shape[1]
        self.exact = self.exact and not evicted
        self.tokens = torch.cat([self.tokens, x], dim=1)
        return logits

    @rule(T=st.integers(1, 5), seed=st.integers(0, 10**6))
    def step(self, T, seed):
        x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
        logits = self.forward(MODEL, x)
        if logits is not None and self.exact and self.tokens.shape[1] <= CONFIG.max_seq_len:
            with torch.no_grad():
                want = MODEL(self.tokens)[:, -T:]  # one uncached pass over every token fed
            diff = (logits - want).abs().max().item()
            assert diff < tolerance(self.name), f"{self.name}: logits off by {diff:.3g}"

    @rule(T=st.integers(1, 3))
    def nan_in_the_last_layer(self, T):
        x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(T))
        assert self.forward(BROKEN, x) is None, "a nan key was accepted"

    @rule()
    def bad_shape(self):
        before = observable(self.cache)
        k = torch.zeros(B, CONFIG.n_kv_heads, 1, CONFIG.head_dim + 1)
        with pytest.raises(KVCacheError):
            self.cache.update(0, k, k)
        assert observable(self.cache) == before

    @rule(data=st.data())
    def crop(self, data):
        n = data.draw(st.integers(0, self.cache.seq_len))
        self.cache.crop(n)
        self.tokens = self.tokens[:, :n] if self.exact else self.tokens
        if n == 0:
            self.exact, self.tokens = True, self.tokens[:, :0]

    @rule()
    def reset(self):
        self.cache.reset()
        self.exact, self.tokens = True, torch.zeros(B, 0, dtype=torch.long)

    @precondition(lambda self: isinstance(self.cache, PagedKVCache))
    @rule()
    def fork_swap_and_free(self):
        """Fork a row, swap the fork out and in (if the pool allows), free it: the active
        rows read exactly as before."""
        cache = self.cache
        before = observable(cache)
        child = cache.fork(cache.active[0])
        cache.swap_out(child)
        try:
            cache.swap_in(child)
        except KVCacheError:
            assert cache.is_swapped(child)  # all or nothing: still safely on the CPU
        cache.free_sequence(child)
        assert observable(cache) == before

    # ---- what always holds --------------------------------------------------------------
    @invariant()
    def invariants(self):
        cache = self.cache
        lens = {cache.layer_len(i) for i in range(cache.n_layers)}
        assert lens == {cache.seq_len}, f"layers at different lengths {lens} between steps"
        assert cache.capacity is None or cache.seq_len <= cache.capacity
        assert cache.lengths.tolist() == (cache.seq_len - cache.start).clamp(min=0).tolist()
        assert 0 <= cache.nbytes_used <= max(cache.nbytes_allocated, 0)
        if self.exact:
            assert cache.seq_len == self.tokens.shape[1]
        elif evicts(cache):
            assert cache.seq_len <= cache.capacity
        if isinstance(cache, PagedKVCache):
            cache.allocator.check_invariants()


CacheMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
test_cache_state_machine = CacheMachine.TestCase
