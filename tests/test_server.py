"""kvlib's OpenAI-compatible server, driven by the official `openai` client over real HTTP.

A server runs in a thread of this process (uvicorn on a free loopback port) so the tests can
look inside its engine; the shutdown test runs `python -m kvlib.server` as a process. Served
tokens are compared with `kvlib.generate` on the same prompt, exactly.
"""

import ast
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.errors import KVLibTypeError, KVLibValueError
from kvlib.generate import generate
from kvlib.pretrained import load_pretrained
from kvlib.server.app import create_app
from kvlib.server.text import IncrementalDecoder, StopStrings
from kvlib.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
MODEL, TOKENIZER = load_pretrained()
NAME = MODEL.config.name
PROMPTS = ["A fool", "The cat sat on", "Love is", "Never", "It is", "Why", "One day", "All"]


def engine_for(model, **kw) -> Engine:
    kw = dict(num_blocks=64, block_size=16, max_num_seqs=16, max_history=0) | kw
    return Engine(model, **kw)


@contextlib.contextmanager
def serving(engine, tokenizer=TOKENIZER):
    """(base URL, app) of a server on a free loopback port, in a thread, for the block."""
    app = create_app(engine, tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not app.state.engine_loop.running, "the engine thread outlived the server"


@pytest.fixture(scope="module")
def server():
    with serving(engine_for(MODEL)) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=30)


def reference(prompt: str | list[int], n: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of greedy `generate` on the prompt alone."""
    ids = TOKENIZER.encode(prompt) if isinstance(prompt, str) else prompt
    eot = TOKENIZER.eot_id
    out = generate(MODEL, torch.tensor([ids]), n, eos_token_id=eot)[0, len(ids) :].tolist()
    if eot in out:
        out = out[: out.index(eot) + 1]
        return TOKENIZER.decode(out[:-1]), len(out), "stop"
    return TOKENIZER.decode(out), len(out), "length"


def engine_state(app) -> tuple[bool, int, int]:
    """(unfinished requests?, requests held, blocks referenced), read in the engine thread."""
    state = lambda e: (  # noqa: E731
        e.has_unfinished(),
        len(e.requests),
        sum(1 for b in range(e.pool.num_blocks) if e.pool.ref[b]),
    )
    return app.state.engine_loop.call(state).result(timeout=10)


# ---- completions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["A fool", TOKENIZER.encode("The cat sat on")])
def test_completion_equals_generate(client, prompt):
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    text, n, finish = reference(prompt, 40)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert isinstance(r.created, int) and len(r.choices) == 1
    c = r.choices[0]
    assert (c.text, c.index, c.logprobs, c.finish_reason) == (text, 0, None, finish)
    prompt_tokens = len(TOKENIZER.encode(prompt)) if isinstance(prompt, str) else len(prompt)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, n)
    assert r.usage.total_tokens == prompt_tokens + n


def test_eos_stops_with_finish_reason_stop_unless_ignore_eos(client):
    # Long enough that the model ends its fortune: finish "stop", the EOS is not in the text.
    text, n, finish = reference("Why", 200)
    assert finish == "stop", "the test needs a prompt whose greedy output reaches EOS"
    r = client.completions.create(model=NAME, prompt="Why", max_tokens=200, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
        text,
        "stop",
        n,
    )
    assert "<|endoftext|>" not in r.choices[0].text
    r = client.completions.create(
        model=NAME, prompt="Why", max_tokens=n + 5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n + 5


def test_stream_equals_generate_one_chunk_per_token(client):
    text, n, finish = reference("A fool", 30)
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt="A fool",
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *tokens, last = chunks
    assert "".join(c.choices[0].text for c in tokens) == text
    assert len(tokens) == n, "one chunk per generated token"
    assert [c.choices[0].finish_reason for c in tokens] == [None] * (n - 1) + [finish]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "text_completion"
    assert last.choices == [] and last.usage.completion_tokens == n


def test_stream_ends_with_done(server):
    body = dict(model=NAME, prompt="Love is", max_tokens=3, temperature=0, stream=True)
    r = httpx.post(f"{server[0]}/completions", json=body, timeout=30)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and len(events) == 3 + 2
    assert all(e.startswith("data: {") for e in events[:3])


def test_sampling_is_seeded(client):
    kw = dict(model=NAME, prompt="A fool", max_tokens=20, temperature=1.0, top_p=0.9)
    kw["extra_body"] = {"top_k": 40}  # an extension (vLLM's too), so not in the client's API
    a = client.completions.create(**kw, seed=1).choices[0].text
    b = client.completions.create(**kw, seed=1).choices[0].text
    c = client.completions.create(**kw, seed=2).choices[0].text
    ids = TOKENIZER.encode("A fool")
    want = generate(MODEL, torch.tensor([ids]), 20, temperature=1.0, top_k=40, top_p=0.9, seed=1)
    eot = TOKENIZER.eot_id
    out = want[0, len(ids) :].tolist()
    out = out[: out.index(eot)] if eot in out else out
    assert a == b == TOKENIZER.decode(out) and a != c


def test_stop_strings_cut_the_text(client):
    text, _, _ = reference("A fool", 40)
    stop = text[10:13]
    want = text[: text.index(stop)]
    kw = dict(model=NAME, prompt="A fool", max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(NAME, "model", "kvlib")]
    assert NAME == "kvlib-fortunes"


def test_concurrent_streams_each_equal_their_solo_result(server):
    async def one(client, prompt, n):
        stream = await client.completions.create(
            model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        client = openai.AsyncOpenAI(base_url=server[0], api_key="none", max_retries=0)
        async with client:
            jobs = [one(client, p, 12 + 5 * i) for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    for i, (prompt, text) in enumerate(zip(PROMPTS, got, strict=True)):
        assert text == reference(prompt, 12 + 5 * i)[0], f"stream {i} ({prompt!r}) differs"
    assert engine_state(server[1]) == (False, 0, 0)


# ---- errors --------------------------------------------------------------------------------------

V, S_MAX = MODEL.config.vocab_size, MODEL.config.max_seq_len
BAD = {
    "temperature < 0": (dict(temperature=-0.5), 400, "temperature"),
    "top_p = 0": (dict(top_p=0.0), 400, "top_p"),
    "top_p > 1": (dict(top_p=1.5), 400, "top_p"),
    "max_tokens 0": (dict(max_tokens=0), 400, "max_tokens"),
    "max_tokens a string": (dict(max_tokens="8"), 400, "max_tokens"),
    "empty prompt": (dict(prompt=""), 400, "prompt"),
    "empty token list": (dict(prompt=[]), 400, "prompt"),
    "token id = V": (dict(prompt=[1, 2, V]), 400, "prompt"),
    "negative token id": (dict(prompt=[-1, 2]), 400, "prompt"),
    "n = 2": (dict(n=2), 400, "n"),
    "logprobs": (dict(logprobs=1), 400, "logprobs"),
    "unknown model": (dict(model="gpt-4"), 404, "model"),
    "too long": (dict(prompt=[5] * (S_MAX - 10), max_tokens=11), 400, "max_tokens"),
    "empty stop string": (dict(stop=[""]), 400, "stop"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_openai_errors(client, case):
    kw, status, param = BAD[case]
    kw = dict(model=NAME, prompt="A fool", max_tokens=4) | kw
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kw)
    err = info.value
    assert err.status_code == status, err.body
    assert err.body["type"] == "invalid_request_error" and err.body["param"] == param, err.body
    assert err.body["message"], err.body
    assert isinstance(err, openai.NotFoundError if status == 404 else openai.BadRequestError)


def test_too_long_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt=[5] * 200, max_tokens=100)
    message = info.value.body["message"]
    assert str(S_MAX) in message and "300" in message, message
    assert info.value.body["code"] == "context_length_exceeded"


def test_bad_json_is_400(server):
    headers = {"Content-Type": "application/json"}
    r = httpx.post(f"{server[0]}/completions", content=b'{"model": ', headers=headers, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "json_invalid"
    r = httpx.post(f"{server[0]}/completions", json={"prompt": "x"}, timeout=10)  # no model
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# ---- the KV cache figures: GET /v1/kvlib/stats ------------------------------------------------


def test_stats_count_prefix_hits_in_prompt_tokens_once_per_request():
    shared = list(range(100, 140))  # 40 tokens: two full blocks of 16 and 8 more
    prompts = [shared + [300 + i, 400 + i, 500 + i] for i in range(4)]
    with serving(engine_for(MODEL, num_blocks=48, block_size=16)) as (url, app):
        first = httpx.get(f"{url}/kvlib/stats", timeout=10).json()
        assert (first["prefix_cache_queries"], first["prefix_hit_rate"]) == (0, 0.0)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)
        for prompt in prompts:  # one after another: each finds the blocks the first computed
            client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0)
        stats = httpx.get(f"{url}/kvlib/stats", timeout=10).json()
    queried, hits = sum(len(p) for p in prompts), 32 * (len(prompts) - 1)
    expected = dict(block_size=16, num_blocks=48, prefix_cache="hash", preemptions=0)
    expected |= dict(prefix_cache_queries=queried, prefix_cache_hits=hits, running=0, waiting=0)
    assert {k: stats[k] for k in expected} == expected, stats
    assert stats["prefix_hit_rate"] == pytest.approx(hits / queried), stats
    assert stats["blocks_used"] == 0 and stats["blocks_cached"] >= 2, stats


def test_stats_count_preemptions_and_each_request_once():
    """Two requests that each need 4 of a 5-block pool: the newer is preempted (recompute)
    and admitted again later, which does not count its prompt a second time."""
    prompts = [list(range(10, 30)), list(range(40, 60))]  # 20 tokens each, no shared block
    engine = engine_for(MODEL, num_blocks=5, block_size=16)
    with serving(engine) as (url, app):
        engine_loop, entered, gate = app.state.engine_loop, threading.Event(), threading.Event()
        engine_loop.call(lambda e: (entered.set(), gate.wait(10)))  # holds the engine thread
        assert entered.wait(10)  # so both requests are queued before its next step

        async def both():
            client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            body = dict(model=NAME, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            sent = [client.completions.create(prompt=p, **body) for p in prompts]
            tasks = [asyncio.ensure_future(s) for s in sent]
            while engine_loop._commands.qsize() < 2:  # both adds queued behind the gate
                await asyncio.sleep(0.01)
            gate.set()
            return await asyncio.gather(*tasks)

        outs = asyncio.run(both())
        stats = engine_loop.stats().result(timeout=10)
    assert [o.usage.completion_tokens for o in outs] == [40, 40]
    assert stats["preemptions"] >= 1, stats
    assert stats["prefix_cache_queries"] == 40, stats  # each prompt counted once
    assert (stats["blocks_used"], stats["running"], stats["waiting"]) == (0, 0, 0), stats


def test_stats_after_the_loop_stopped_is_503():
    with serving(engine_for(MODEL)) as (url, app):
        app.state.engine_loop.stop()
        r = httpx.get(f"{url}/kvlib/stats", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


# ---- a client that goes away; the loop that ends -------------------------------------------------


def test_disconnect_cancels_the_request_and_frees_its_blocks(server):
    url, app = server
    engine = app.state.engine_loop.engine
    cancelled = []
    cancel = engine.cancel
    engine.cancel = lambda rid: (cancelled.append(rid), cancel(rid))[1]
    try:
        body = dict(model=NAME, prompt="A fool", max_tokens=240, temperature=0, stream=True)
        body["ignore_eos"] = True
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as r:
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(line)
                if len(chunks) == 2:
                    break
        assert len(chunks) == 2
        deadline = time.monotonic() + 10
        while engine_state(app) != (False, 0, 0):
            assert time.monotonic() < deadline, f"still held: {engine_state(app)}"
            time.sleep(0.02)
        assert len(cancelled) == 1, "the request ran on after its client left"
    finally:
        engine.cancel = cancel
    app.state.engine_loop.call(lambda e: e.check_drained()).result(timeout=10)


def test_stopping_the_loop_ends_open_streams_with_abort():
    with serving(engine_for(MODEL)) as (url, app):
        body = dict(model=NAME, prompt="A fool", max_tokens=240, stream=True, ignore_eos=True)
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            app.state.engine_loop.stop()
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "abort"' in rest[-2]
        assert len(rest) < 240
        r = httpx.post(f"{url}/completions", json=dict(model=NAME, prompt="A"), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_a_failing_engine_aborts_its_streams_and_refuses_new_requests():
    engine = engine_for(MODEL)
    step = engine.step

    def failing_step():
        if engine.num_steps == 3:
            raise RuntimeError("a bug in the engine")
        return step()

    engine.step = failing_step
    with serving(engine) as (url, app):
        body = dict(model=NAME, prompt="A fool", max_tokens=20, stream=True, ignore_eos=True)
        r = httpx.post(f"{url}/completions", json=body, timeout=30)
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "abort"' in events[-2]
        assert len(events) == 3 + 2, events  # three tokens, the abort, [DONE]
        r = httpx.post(f"{url}/completions", json=dict(model=NAME, prompt="A"), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_kvlib_server_exits_0_on_sigint():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kvlib.server", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not start in 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        body = dict(model=NAME, prompt="A fool", max_tokens=240, stream=True, ignore_eos=True)
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert proc.wait(timeout=15) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- incremental decoding: a stream never splits a character -------------------------------------


def parrot(text: str) -> Transformer:
    """A model whose greedy continuation repeats `text`'s tokens in a cycle: each token's
    embedding is a one-hot vector, and the output matrix maps it to the next token (the
    attention and MLP outputs are zero, so logits depend on the last token only)."""
    ids = TOKENIZER.encode(text)
    assert len(set(ids)) == len(ids), f"every token of {text!r} must occur once"
    model = Transformer(MODEL.config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        for slot, (tok, nxt) in enumerate(zip(ids, ids[1:] + ids[:1], strict=True)):
            model.tok_embeddings.weight[tok, slot] = 1.0
            model.output.weight[nxt, slot] = 10.0
    return model


UNICODE = "😀中é ж→!"  # 4-, 3-, 2-byte characters: single-byte tokens in the book's tokenizer


def test_a_stream_of_split_characters_arrives_whole():
    model = parrot(UNICODE)
    ids = TOKENIZER.encode(UNICODE)
    assert len(ids) > len(UNICODE), "the text must have characters split over tokens"
    with serving(engine_for(model)) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        kw = dict(model=NAME, prompt=UNICODE, max_tokens=3 * len(ids), temperature=0)
        pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True)]
        plain = client.completions.create(**kw).choices[0].text
    assert plain == UNICODE * 3
    assert "".join(pieces) == UNICODE * 3, pieces
    assert not any("\ufffd" in p for p in pieces), pieces
    assert len(pieces) == 3 * len(ids) and "" in pieces  # held bytes give empty chunks


def test_incremental_decoder_pieces_join_to_decode():
    text = "naïve café: 日本語 😀👍🏽, ok"
    ids = TOKENIZER.encode(text)
    dec = IncrementalDecoder(TOKENIZER)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == TOKENIZER.decode(ids)
    assert all("\ufffd" not in p for p in pieces), pieces
    # A character cut off at the end becomes a replacement character, as decode makes it.
    cut = TOKENIZER.encode("ab😀")[:-1]
    dec = IncrementalDecoder(TOKENIZER)
    assert "".join([dec.push(i) for i in cut] + [dec.flush()]) == TOKENIZER.decode(cut)


@pytest.mark.parametrize(
    "pieces, stops, sent, stopped",
    [
        (["ab", "c\n", "\nde"], ["\n\n"], "abc", True),
        (["ab", "c\n", "de"], ["\n\n"], "abc\nde", False),
        (["xy", "zEN", "Dq"], ["END", "yz"], "x", True),
        (["aEN", "Xb"], ["END"], "aENXb", False),
    ],
)
def test_stop_strings_hold_back_what_may_become_one(pieces, stops, sent, stopped):
    stop, out, hit = StopStrings(stops), "", False
    for p in pieces:
        text, hit = stop.push(p)
        out += text
        if hit:
            break
    if not hit:
        out += stop.flush()
    assert (out, hit) == (sent, stopped)


# ---- the engine's bounded history; packaging -----------------------------------------------------


@pytest.mark.parametrize("cap", [None, 0, 3])
def test_engine_history_cap(cap):
    engine = Engine(MODEL, num_blocks=8, block_size=16, max_history=cap)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=10))
    engine.run()
    steps = list(range(1, engine.num_steps + 1))
    want = steps if cap is None else steps[len(steps) - cap :] if cap else []
    assert [h["step"] for h in engine.history] == want and engine.num_steps == 10


def test_engine_history_cap_is_checked():
    with pytest.raises(KVLibValueError, match="max_history"):
        Engine(MODEL, num_blocks=8, max_history=-1)
    with pytest.raises(KVLibTypeError, match="max_history"):
        Engine(MODEL, num_blocks=8, max_history=2.0)


def test_import_kvlib_server_needs_no_fastapi():
    # kvlib does not import kvlib.server, whose __init__ imports nothing.
    package = ast.parse((ROOT / "kvlib" / "__init__.py").read_text())
    server = ast.parse((ROOT / "kvlib" / "server" / "__init__.py").read_text())
    imported = [n for n in ast.walk(package) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any("server" in ast.unparse(n) for n in imported)
    assert not [n for n in ast.walk(server) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_serve_extra_is_pinned_and_installed_by_make_test():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    names = [re.split(r"[<>=]", r)[0] for r in extras["serve"]]
    assert {"fastapi", "uvicorn", "openai"} <= set(names)
    assert all(n in pins for n in names), [n for n in names if n not in pins]
    assert re.search(r"-e \"\.\[[a-z,]*serve[a-z,]*\]\"", (ROOT / "Makefile").read_text())
