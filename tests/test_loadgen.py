"""The load generator replays a trace against kvlib's server over HTTP (the `openai` client),
measures what the engine's own replay measures, stays within its bounds, and only talks to
this machine."""

import asyncio
import json
import threading
import time

import pytest

from kvlib import loadgen
from kvlib.engine.trace import sharegpt_like
from kvlib.errors import KVLibValueError
from tests.test_server import MODEL, NAME, engine_for, engine_state, serving

TRACE = dict(vocab_size=MODEL.config.vocab_size, mean_prompt=12, mean_output=8)
TRACE |= dict(max_prompt=24, max_output=12)


@pytest.fixture(scope="module")
def server():
    with serving(engine_for(MODEL)) as (url, app):
        yield url, app


def test_replay_against_the_kvlib_server(server):
    url, app = server
    trace = sharegpt_like(6, 40.0, seed=3, **TRACE)
    records = asyncio.run(loadgen.replay(url, NAME, trace, timeout=60))
    for req, rec in zip(trace, records, strict=True):
        assert rec["error"] is None, rec["error"]
        # ignore_eos: exactly the trace's output length, one streamed chunk per token
        assert len(rec["token_times"]) == rec["completion_tokens"] == req.max_new_tokens
        assert rec["arrival"] >= req.arrival  # sent on the trace's schedule, never before
        assert rec["token_times"] == sorted(rec["token_times"]) and rec["token_times"][0] > 0
    figures = loadgen.report(records)
    n_out = sum(r.max_new_tokens for r in trace)
    assert (figures["sent"], figures["finished"], figures["requests"]) == (6, 6, 6)
    assert figures["output_tokens"] == figures["completion_tokens"] == n_out
    assert (figures["timed_out"], figures["failed"]) == (0, 0)
    assert 0 < figures["ttft_p50"] <= figures["ttft_p99"]
    assert 0 < figures["tpot_p50"] <= figures["tpot_p99"]
    last = max(r["token_times"][-1] for r in records)
    assert figures["throughput"] == pytest.approx(n_out / (last - records[0]["arrival"]))
    assert engine_state(app) == (False, 0, 0)


def test_the_whole_run_is_bounded_by_its_timeout(server):
    url, app = server
    gate = threading.Event()
    app.state.engine_loop.call(lambda e: gate.wait(30))  # the engine makes no token meanwhile
    try:
        trace = sharegpt_like(3, 1000.0, seed=1, **TRACE)
        t0 = time.perf_counter()
        records = asyncio.run(loadgen.replay(url, NAME, trace, timeout=0.5))
        took = time.perf_counter() - t0
    finally:
        gate.set()
    assert [r["error"] for r in records] == ["timeout"] * 3
    assert took < 5, f"the run took {took:.1f} s with a 0.5 s timeout"
    figures = loadgen.report(records)
    assert (figures["sent"], figures["finished"], figures["timed_out"]) == (3, 0, 3)
    deadline = time.monotonic() + 10  # the closed streams cancelled the requests
    while engine_state(app) != (False, 0, 0):
        assert time.monotonic() < deadline, engine_state(app)
        time.sleep(0.02)


def test_cli_prints_and_writes_json(server, tmp_path, capsys):
    out = tmp_path / "run" / "loadgen.json"
    argv = ["--base-url", server[0], "--model", NAME, "--num-requests", "3", "--rate", "50"]
    argv += ["--mean-prompt", "10", "--mean-output", "5", "--max-prompt", "20"]
    argv += ["--max-output", "8", "--json", str(out)]
    assert loadgen.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["figures"]["finished"] == 3 and saved["args"]["num_requests"] == 3
    for key in ("throughput", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
        assert key in printed and saved["figures"][key] > 0


def test_an_unknown_model_fails_every_request_and_the_cli_says_so(server, capsys):
    argv = ["--base-url", server[0], "--model", "nope", "--num-requests", "2", "--rate", "50"]
    assert loadgen.main(argv + ["--max-prompt", "20", "--max-output", "8"]) == 1
    captured = capsys.readouterr()
    assert "failed: 2" in captured.out and "NotFoundError" in captured.err


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/v1",
        "http://10.0.0.1:8000/v1",
        "http://127.0.0.1.example.com/v1",
        "http://0.0.0.0:8000/v1",
        "ftp://127.0.0.1/v1",
        "127.0.0.1:8000",
    ],
)
def test_refuses_hosts_that_are_not_this_machine(url, capsys):
    with pytest.raises(KVLibValueError, match="base_url|loopback"):
        loadgen.check_loopback(url)
    trace = sharegpt_like(1, 1.0, **TRACE)
    with pytest.raises(KVLibValueError):
        asyncio.run(loadgen.replay(url, NAME, trace, timeout=1))
    assert loadgen.main(["--base-url", url, "--num-requests", "1"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"]
)
def test_accepts_loopback_hosts(url):
    assert loadgen.check_loopback(url) == url


def test_request_count_is_bounded():
    assert loadgen.main(["--num-requests", str(loadgen.MAX_REQUESTS + 1)]) == 2
