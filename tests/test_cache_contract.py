"""The cache contract: every kvlib cache class passes the same tests.

A new cache class is covered by adding one line to CACHES (a test fails until it is there).
The contract: the model and `generate` run on the cache unchanged and give the contiguous
reference's results; capacity, crop, reset, padding and memory accounting behave alike; and a
failed call changes nothing. "Nothing changed" is checked the way a user would see it: the
cache's bookkeeping is as before, and continuing from it gives exactly what a twin cache that
never saw the failure gives.
"""

import inspect
import math

import pytest
import torch

import kvlib.eviction
import kvlib.paged
import kvlib.paged_quant
import kvlib.quant
from kvlib.cache import Cache
from kvlib.chunked import chunked_prefill
from kvlib.config import tiny
from kvlib.engine.kv import StepCache
from kvlib.errors import CacheFullError, KVCacheError
from kvlib.eviction import EvictionCache, FullCache, H2OCache, SinkCache, SlidingWindowCache
from kvlib.generate import generate, pad_prompts, teacher_forced_logits
from kvlib.kv_cache import ConcatKVCache, KVCache
from kvlib.paged import PagedKVCache
from kvlib.paged_quant import PagedQuantKVCache
from kvlib.quant import QuantizedKVCache, kivi
from tests.models import model_for

CONFIG = tiny(max_seq_len=64)  # L=2, H=4, K=2, D=8, V=64
L, H, K, D, V = CONFIG.n_layers, CONFIG.n_heads, CONFIG.n_kv_heads, CONFIG.head_dim, 64

# name -> (make(B, S): a cache for B rows of up to S tokens, lossless while S tokens fit)
CACHES = {
    "KVCache": (lambda B, S: KVCache.from_config(CONFIG, B, S), True),
    "ConcatKVCache": (lambda B, S: ConcatKVCache(L, B, K, D, S), True),
    "PagedKVCache": (lambda B, S: PagedKVCache.from_config(CONFIG, B, num_blocks=B * S), True),
    "KIVI-4": (lambda B, S: QuantizedKVCache.from_config(CONFIG, B, S, kivi(4, 8)), False),
    "int8": (lambda B, S: QuantizedKVCache.from_config(CONFIG, B, S, "int8 per-token"), False),
    "FP8": (lambda B, S: QuantizedKVCache.from_config(CONFIG, B, S, "FP8 per-head"), False),
    "PagedQuant-int8": (
        lambda B, S: PagedQuantKVCache.from_config(CONFIG, B, num_blocks=B * S),
        False,
    ),
    "PagedQuant-FP8": (
        lambda B, S: PagedQuantKVCache.from_config(
            CONFIG, B, num_blocks=B * S, block_size=4, scheme="FP8 per-tensor"
        ),
        False,
    ),
    "FullCache": (lambda B, S: FullCache.from_config(CONFIG, S, B), True),
    "SlidingWindowCache": (lambda B, S: SlidingWindowCache.from_config(CONFIG, S, B), True),
    "SinkCache": (lambda B, S: SinkCache.from_config(CONFIG, S, B, n_sink=2), True),
    "H2OCache": (lambda B, S: H2OCache.from_config(CONFIG, S, B), True),
}
NAMES = list(CACHES)
B, S_MAX = 2, 32


def make(name, B=B, S=S_MAX):
    return CACHES[name][0](B, S)


def lossless(name):
    return CACHES[name][1]


def tolerance(name):
    """Largest logit difference from the contiguous cache: float32 round-off, or the error of
    a quantized cache on this random test model (measured up to 0.6 for KIVI-4 after a crop,
    which keeps cut tokens dequantized; a wrong position or mask moves logits by several)."""
    if "FP8" in name:  # 3 mantissa bits: each number within 1/16 of itself (measured up to 1.1)
        return 2.0
    return 1e-5 if lossless(name) else 1.0


def evicts(cache):
    return isinstance(cache, EvictionCache) and not isinstance(cache, FullCache)


@pytest.fixture(scope="module")
def model():
    return model_for(CONFIG)


def ids(B=B, T=5, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def observable(cache):
    """Everything a user can read off a cache without writing to it: the interface's
    bookkeeping, and the public state of each kind (a pool's free list and reference counts,
    an evicting cache's stream counters and kept tokens, H2O's scores)."""
    state = [
        cache.seq_len,
        [cache.layer_len(i) for i in range(cache.n_layers)],
        cache.lengths.tolist(),
        cache.start.tolist(),
        cache.valid_mask(cache.seq_len).tolist(),
        cache.nbytes_used,
        cache.nbytes_allocated,
    ]
    if isinstance(cache, PagedKVCache):
        pool = cache.allocator
        refs = [pool.refcount(b) for b in range(pool.num_blocks)]
        tables = {i: cache.block_table(i) for i in cache.sequences}
        state += [pool.free_blocks(), refs, tables, cache.active]
    if isinstance(cache, EvictionCache):
        kept = [cache.kept_positions(i).tolist() for i in range(cache.n_layers)]
        state += [cache.n_seen, cache.n_evicted, kept]
    if isinstance(cache, H2OCache):
        state += [[s[:, :, : cache.seq_len].tolist() for s in cache.scores]]
    return state


def run(model, cache, chunks):
    """Feed token chunks (B, T_i) one forward pass each; return the logits (B, sum T_i, V)."""
    with torch.no_grad():
        return torch.cat([model(x, cache) for x in chunks], dim=1)


def assert_same_future(model, cache, twin, seed=9):
    """cache and its twin read the same and continue the same: nothing the failure did shows."""
    assert observable(cache) == observable(twin)
    nxt = ids(cache.batch_size, 1, seed)
    a, b = run(model, cache, [nxt]), run(model, twin, [nxt])
    assert torch.equal(a, b), f"after the failure, logits differ by {(a - b).abs().max():.3g}"
    assert observable(cache) == observable(twin)


def pair(name, model, T=5, **kw):
    """Two caches with the same history: a prefill of T tokens and one decode step."""
    caches = [make(name, **kw), make(name, **kw)]
    x = ids(caches[0].batch_size, T + 1)
    for cache in caches:
        run(model, cache, [x[:, :T], x[:, T:]])
    return caches


# ---- every class is covered -----------------------------------------------------------------


def test_every_kvlib_cache_class_is_in_the_contract():
    assert inspect.isabstract(Cache)
    found, stack = set(), [Cache]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("kvlib.") and not inspect.isabstract(sub):
                found.add(sub)
    covered = {type(make(name, 1, 8)) for name in NAMES}
    # The engine's StepCache lives for one forward pass over requests packed into one row; its
    # storage is the engine's block pool, and tests/test_engine*.py check it against generate.
    found -= {StepCache}
    assert found, "no cache classes found"
    assert found <= covered, f"add these to CACHES: {sorted(c.__name__ for c in found - covered)}"
    modules = {kvlib.paged, kvlib.paged_quant, kvlib.quant, kvlib.eviction.policies}
    assert {inspect.getmodule(c) for c in found} >= modules


# ---- sizes and results ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_declares_its_sizes_and_starts_empty(name):
    cache = make(name)
    assert isinstance(cache, Cache)
    assert (cache.n_layers, cache.batch_size, cache.n_kv_heads, cache.head_dim) == (L, B, K, D)
    assert cache.dtype == torch.float32 and cache.device == torch.device("cpu")
    assert cache.capacity in (None, S_MAX)
    assert cache.seq_len == 0 and cache.lengths.tolist() == cache.start.tolist() == [0, 0]
    assert cache.nbytes_used == 0 and cache.nbytes_allocated >= 0  # a pool is held by blocks
    assert cache.next_positions(3).tolist() == [[0, 1, 2]] * B


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_the_contiguous_reference_and_an_uncached_pass(name, model):
    x = ids(T=12)
    chunks = [x[:, :5]] + [x[:, t : t + 1] for t in range(5, 12)]
    got = run(model, make(name), chunks)
    want = run(model, KVCache.from_config(CONFIG, B, S_MAX), chunks)
    with torch.no_grad():
        uncached = model(x)
    tol = tolerance(name)
    for ref in (want, uncached):
        diff = (got - ref).abs().max().item()
        assert diff < tol, f"{name}: logits differ by {diff:.3g} (tolerance {tol})"


@pytest.mark.parametrize("name", [n for n in NAMES if lossless(n)])
def test_generate_gives_the_uncached_tokens(name, model):
    prompt = ids(T=6, seed=3)
    want = generate(model, prompt, 12, use_cache=False)
    cache = make(name)
    assert torch.equal(generate(model, prompt, 12, cache=cache), want)
    assert cache.seq_len == 6 + 12 - 1


# ---- capacity, crop, reset, padding, memory ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_capacity(name, model):
    cache = make(name, S=8)
    if cache.capacity is None:  # a paged cache: its pool is the limit
        assert isinstance(cache, PagedKVCache)
        return
    run(model, cache, [ids(T=6)])
    before = observable(cache)
    if evicts(cache):
        cache.check_room(100)  # room is made a step at a time
        run(model, cache, [ids(T=1, seed=s) for s in range(5)])
        assert cache.seq_len == 8 and cache.n_evicted == 3
        return
    with pytest.raises(CacheFullError, match="holds 6 of 8"):
        cache.check_room(3)
    with pytest.raises(CacheFullError):
        run(model, cache, [ids(T=3)])
    assert observable(cache) == before
    with pytest.raises(CacheFullError):
        generate(model, ids(T=1), 4, cache=cache)
    assert observable(cache) == before


@pytest.mark.parametrize("name", NAMES)
def test_crop_reads_the_prefix_and_continues(name, model):
    x = ids(T=10)
    cache, twin = make(name), make(name)
    run(model, cache, [x[:, :6], x[:, 6:8]])
    cache.crop(6)
    run(model, twin, [x[:, :6]])
    assert observable(cache)[:5] == observable(twin)[:5]
    a, b = run(model, cache, [x[:, 8:]]), run(model, twin, [x[:, 8:]])
    assert (a - b).abs().max().item() < tolerance(name)
    with pytest.raises(KVCacheError, match="crop length"):
        cache.crop(cache.seq_len + 1)


@pytest.mark.parametrize("name", NAMES)
def test_reset_forgets_everything(name, model):
    cache = make(name)
    first = generate(model, ids(T=4), 5, cache=cache)
    cache.reset()
    assert cache.seq_len == 0 and cache.lengths.tolist() == [0, 0] and cache.nbytes_used == 0
    assert torch.equal(generate(model, ids(T=4), 5, cache=cache), first)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding(name, model):
    tokens, mask = pad_prompts([[5, 6, 7], [1, 2, 3, 4, 9, 8]])
    cache = make(name)
    if isinstance(cache, EvictionCache):  # streams have no padding: refused, nothing changes
        with pytest.raises(KVCacheError, match="unpadded streams"):
            generate(model, tokens, 4, attention_mask=mask, cache=cache)
        assert observable(cache) == observable(make(name))
        return
    got = generate(model, tokens, 6, attention_mask=mask, cache=cache)
    assert cache.start.tolist() == [3, 0] and cache.lengths.tolist() == [8, 11]
    if lossless(name):
        want = generate(model, tokens, 6, attention_mask=mask, use_cache=False)
        assert torch.equal(got, want)
    with pytest.raises(KVCacheError, match="before the first write"):
        cache.set_left_padding(torch.tensor([1, 0]))


@pytest.mark.parametrize("name", NAMES)
def test_memory_accounting(name, model):
    cache = make(name)
    used = [cache.nbytes_used]
    for chunk in [ids(T=4)] + [ids(T=1, seed=s) for s in range(3)]:
        run(model, cache, [chunk])
        used.append(cache.nbytes_used)
        assert 0 < cache.nbytes_used <= cache.nbytes_allocated
    assert used == sorted(used) and used[0] == 0
    bytes_per_token = 2 * L * K * D * 4  # K and V, fp32
    if isinstance(cache, PagedQuantKVCache):  # codes and per-token scales, nothing else
        assert cache.nbytes_used == B * 7 * cache.scheme.bytes_per_token(D, K, L)
    elif isinstance(cache, (KVCache, ConcatKVCache, PagedKVCache, EvictionCache)):
        assert cache.nbytes_used == B * 7 * bytes_per_token


# ---- a failed call changes nothing ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_to_attend_and_update_change_nothing(name, model):
    cache, twin = pair(name, model)
    q = torch.randn(B, H, 1, D)
    good = torch.randn(B, K, 1, D)
    nan = good.clone()
    nan[1, 0, 0, 3] = float("nan")
    bad_calls = [
        (KVCacheError, lambda: cache.attend(0, q, torch.randn(B, K + 1, 1, D), good, None)),
        (KVCacheError, lambda: cache.update(0, good.double(), good.double())),
        (KVCacheError, lambda: cache.attend(0, q, nan, good, None)),
        (KVCacheError, lambda: cache.attend(0, q[:, :3], good, good, None)),
        (IndexError, lambda: cache.attend(L, q, good, good, None)),
        (KVCacheError, lambda: cache.update(0, good, torch.full_like(good, math.inf))),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
        assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_forward_failing_in_the_last_layer_rolls_back(name, model):
    """A nan key in the last layer is refused after the first layer wrote: roll back."""
    cache, twin = pair(name, model)
    broken = model_for(CONFIG)
    with torch.no_grad():
        broken.layers[-1].attn.wk.weight[0, 0] = float("nan")
    for x in (ids(T=1, seed=4), ids(T=3, seed=5)):
        with pytest.raises(KVCacheError, match="nan or inf"):
            broken(x, cache)
        assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_forward_failing_after_an_eviction_rolls_the_eviction_back(name, model):
    cache, twin = pair(name, model, T=7, S=8)  # full: the next token needs room
    broken = model_for(CONFIG)
    with torch.no_grad():
        broken.layers[-1].attn.wk.weight[0, 0] = float("nan")
    error = "nan or inf" if evicts(cache) or cache.capacity is None else "overflow"
    with pytest.raises(KVCacheError, match=error):
        broken(ids(T=1, seed=4), cache)
    assert getattr(cache, "n_evicted", 0) == 0
    if error == "overflow":  # full, and nothing to continue with
        assert observable(cache) == observable(twin)
    else:
        assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_padded_forward_that_fails_leaves_no_padding(name, model):
    tokens, mask = pad_prompts([[5, 6, 7], [1, 2, 3, 4, 9, 8]])
    cache, twin = make(name), make(name)
    broken = model_for(CONFIG)
    with torch.no_grad():
        broken.layers[-1].attn.wv.weight[0, 0] = float("inf")
    with pytest.raises(KVCacheError):
        broken(tokens, cache, mask)
    assert cache.start.tolist() == [0, 0]
    assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_generate_failing_midway_rolls_back(name, model):
    cache, twin = pair(name, model)

    def stop(step, tokens):
        if step == 3:
            raise RuntimeError("stopped by the caller")

    with pytest.raises(RuntimeError, match="stopped"):
        generate(model, ids(T=2, seed=6), 8, cache=cache, stream=stop)
    assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_failing_midway_rolls_back(name, model):
    cache, twin = pair(name, model)
    calls = []
    real = cache.attend

    def attend(layer, q, k, v, mask):
        calls.append(layer)
        if len(calls) > L:  # the second chunk's first layer
            raise RuntimeError("injected failure")
        return real(layer, q, k, v, mask)

    cache.attend = attend
    with pytest.raises(RuntimeError, match="injected"):
        chunked_prefill(model, ids(T=6, seed=7), cache, chunk_size=3)
    del cache.attend
    assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_stream_failing_midway_rolls_back(name, model):
    cache, twin = pair(name, model, S=16)  # 6 tokens held
    # the last of 9 passes for a stream that fits, or the 14th, after 5 evictions
    n, fail_at = (20, 14) if evicts(cache) else (10, 9)
    steps = []
    real = cache.attend

    def attend(layer, q, k, v, mask):
        steps.append(layer)
        if len(steps) > (fail_at - 1) * L:
            raise RuntimeError("injected failure")
        return real(layer, q, k, v, mask)

    cache.attend = attend
    with pytest.raises(RuntimeError, match="injected"):
        teacher_forced_logits(model, ids(T=n, seed=8), cache, prefill=2)
    del cache.attend
    assert_same_future(model, cache, twin)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_cache_for_the_model_is_refused(name, model):
    cache = make(name, B=3)
    with pytest.raises(ValueError, match="3 rows"):
        model(ids(T=2), cache)
    assert observable(cache) == observable(make(name, B=3))
    with pytest.raises(TypeError, match="kvlib cache"):
        model(ids(T=2), {"keys": []})
    other = model_for(tiny(n_kv_heads=4))
    with pytest.raises(KVCacheError, match="n_kv_heads=2, the model needs 4"):
        other(ids(T=2), make(name))
