"""The engine serves every request exactly as `generate` would serve it alone.

Property tests over random traces: any arrival order, batch composition, token budget, block
size, preemption policy, prefix-cache kind and state, with pools small enough to force
preemption and eviction. After a trace drains no block is held and the cached blocks serve the
next request. Seeded sampling gives each request the same tokens whatever batch it runs in.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.generate import generate
from tests.models import CONFIGS, model_for

MODELS = {kind: model_for(config) for kind, config in CONFIGS.items()}


@functools.cache
def reference(kind: str, prompt: tuple, n: int, eos: int | None, seed: int | None = None):
    """`generate` on the request alone: its output tokens."""
    kw = dict(eos_token_id=eos)
    if seed is not None:
        kw.update(temperature=1.0, top_k=20, seed=seed)
    out = generate(MODELS[kind], torch.tensor([prompt]), n, **kw)
    return out[0, len(prompt) :].tolist()


@st.composite
def traces(draw):
    """A trace: requests (prompt, max_new_tokens, arrival step, eos), most sharing a prefix."""
    shared = draw(st.lists(st.integers(0, 63), min_size=0, max_size=12))
    reqs = []
    for _ in range(draw(st.integers(1, 6))):
        own = draw(st.lists(st.integers(0, 63), min_size=1, max_size=10))
        prompt = (shared if draw(st.booleans()) else []) + own
        n = draw(st.integers(1, 12))
        eos = draw(st.one_of(st.none(), st.integers(0, 63)))
        reqs.append((tuple(prompt), n, draw(st.integers(0, 6)), eos))
    return reqs


engines = st.fixed_dictionaries(
    dict(
        block_size=st.sampled_from([1, 2, 4, 8]),
        spare_blocks=st.integers(0, 6),  # blocks beyond what the largest request needs
        max_num_tokens=st.integers(1, 40),
        max_num_seqs=st.integers(1, 6),
        prefix_cache=st.sampled_from([None, "hash", "radix"]),
        preemption=st.sampled_from(["recompute", "swap"]),
        attention=st.sampled_from(["fused", "gather"]),
    )
)


def make_engine(kind, trace, opts):
    P = opts["block_size"]
    biggest = max(len(p) + n - 1 for p, n, _, _ in trace)
    return Engine(
        MODELS[kind],
        num_blocks=-(-biggest // P) + opts["spare_blocks"],
        block_size=P,
        max_num_tokens=opts["max_num_tokens"],
        max_num_seqs=opts["max_num_seqs"],
        prefix_cache=opts["prefix_cache"],
        preemption=opts["preemption"],
        attention=opts["attention"],
    )


def replay(engine, trace, cancel_at=None):
    """Feed the trace (requests join at their arrival steps), step until it drains."""
    ids, step = {}, 0
    pending = sorted(range(len(trace)), key=lambda i: trace[i][2])
    while pending or engine.has_unfinished():
        while pending and trace[pending[0]][2] <= step:
            i = pending.pop(0)
            p, n, _, eos = trace[i]
            ids[i] = engine.add_request(list(p), SamplingParams(max_new_tokens=n, eos_token_id=eos))
        if cancel_at is not None and step == cancel_at[1] and cancel_at[0] in ids:
            engine.cancel(ids[cancel_at[0]])
        engine.step()
        step += 1
        assert step < 2000, "the trace does not drain"
    engine.pool.check_invariants()
    return ids


@settings(max_examples=60)
@given(kind=st.sampled_from(list(MODELS)), trace=traces(), opts=engines)
def test_every_request_gets_the_tokens_generate_gives_it_alone(kind, trace, opts):
    engine = make_engine(kind, trace, opts)
    ids = replay(engine, trace)
    for i, (p, n, _, eos) in enumerate(trace):
        got = engine.requests[ids[i]].output
        want = reference(kind, p, n, eos)
        assert got == want, f"request {i} {p}: engine {got} vs generate {want} ({opts})"
    engine.check_drained()
    assert engine.pool.num_free == engine.pool.num_blocks


@settings(max_examples=25)
@given(kind=st.sampled_from(list(MODELS)), trace=traces(), opts=engines, data=st.data())
def test_cancel_frees_the_request_and_leaves_the_others_exact(kind, trace, opts, data):
    victim = data.draw(st.integers(0, len(trace) - 1))
    at = data.draw(st.integers(0, 12))
    engine = make_engine(kind, trace, opts)
    ids = replay(engine, trace, cancel_at=(victim, at))
    for i, (p, n, _, eos) in enumerate(trace):
        got, want = engine.requests[ids[i]].output, reference(kind, p, n, eos)
        if engine.requests[ids[i]].finish_reason == "cancelled":
            assert got == want[: len(got)], f"cancelled request {i}: {got} vs {want}"
        else:
            assert got == want, f"request {i}: engine {got} vs generate {want}"
    engine.check_drained()


@settings(max_examples=25)
@given(kind=st.sampled_from(list(MODELS)), trace=traces(), opts=engines)
def test_after_a_trace_drains_cached_blocks_serve_the_next_request(kind, trace, opts):
    engine = make_engine(kind, trace, opts)
    replay(engine, trace)
    engine.check_drained()
    p, n, _, eos = max(trace, key=lambda r: len(r[0]))
    first = engine.add_request(list(p), SamplingParams(max_new_tokens=n, eos_token_id=eos))
    engine.run()
    again = engine.add_request(list(p), SamplingParams(max_new_tokens=n, eos_token_id=eos))
    engine.run()
    P = engine.pool.block_size
    hits = engine.requests[again].num_cached
    expected = (len(p) - 1) // P * P if opts["prefix_cache"] else 0
    assert hits == expected, f"replayed prompt of {len(p)} found {hits} cached tokens"
    assert (
        engine.requests[again].output == engine.requests[first].output == reference(kind, p, n, eos)
    )
    engine.check_drained()


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_seeded_sampling_is_the_same_in_any_batch(preemption):
    """Each request samples from its own generator: alone (generate), or in any engine batch."""
    prompts = [tuple(range(i, i + 5 + 3 * i)) for i in range(5)]
    runs = []
    for budget, blocks in ((64, 40), (3, 12), (7, 9)):
        engine = Engine(
            MODELS["GQA"],
            num_blocks=blocks,
            block_size=4,
            max_num_tokens=budget,
            preemption=preemption,
        )
        order = list(range(5)) if budget != 3 else list(reversed(range(5)))
        ids = {}
        for i in order:
            ids[i] = engine.add_request(
                list(prompts[i]),
                SamplingParams(max_new_tokens=14, temperature=1.0, top_k=20, seed=100 + i),
            )
        engine.run()
        engine.check_drained()
        runs.append([engine.requests[ids[i]].output for i in range(5)])
    assert runs[0] == runs[1] == runs[2], f"sampled tokens depend on the batch: {runs}"
    for i in range(5):
        want = reference("GQA", prompts[i], 14, None, seed=100 + i)
        assert runs[0][i] == want, f"request {i}: engine {runs[0][i]} vs generate {want}"
    assert len({t for out in runs[0] for t in out}) > 10, "degenerate sampling: few distinct tokens"
