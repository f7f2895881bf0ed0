"""A load generator: a ShareGPT-like trace replayed against any OpenAI-compatible server.

    python -m kvlib.server &                                  # or vLLM, on the same port
    python -m kvlib.loadgen --base-url http://127.0.0.1:8000/v1 --model kvlib-fortunes

The trace is `kvlib.engine.trace.sharegpt_like`: prompt lengths in tokens, output lengths,
Poisson arrivals. Each request is sent when its arrival comes (measured from the start), with
its prompt as a list of token ids, so the same trace means the same work on any server
whatever its tokenizer (give `--vocab-size` of the server's model so every id is valid). It
asks for exactly the trace's output length: `max_tokens`, and `ignore_eos` so the model cannot
stop early (vLLM accepts it too). Every request streams (the official `openai` client), and
the time each chunk arrives is the time of its tokens: one token per chunk (kvlib's server
sends one chunk per token), or as many as the chunk's `token_ids` list where the server sends
one (asked for with vLLM's `return_token_ids`: vLLM puts several tokens in one chunk when its
client falls behind), so `kvlib.engine.trace.summarize` gives the same figures as a replay
inside the engine: output tokens per second, TTFT and TPOT p50/p99.

It is bounded: at most `--num-requests` requests and `--timeout` seconds in all (requests still
running then are cancelled and counted). It only talks to this machine (a loopback host):
pointed elsewhere it refuses, so it cannot load someone else's server by mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from kvlib.engine.trace import TraceRequest, sharegpt_like, summarize
from kvlib.errors import KVLibError, KVLibValueError, check_int

MAX_REQUESTS = 10_000


def check_loopback(base_url: str) -> str:
    """`base_url` if its host is this machine (localhost, 127.0.0.0/8, ::1); else raise."""
    if not isinstance(base_url, str):
        raise KVLibValueError(f"base_url must be a URL string, got {base_url!r}")
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise KVLibValueError(f"base_url must be http(s)://host:port/..., got {base_url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise KVLibValueError(
            f"the load generator only sends to this machine (localhost, 127.0.0.1, ::1); "
            f"{host!r} in {base_url!r} is not a loopback host"
        )
    return base_url


async def replay(
    base_url: str,
    model: str,
    trace: list[TraceRequest],
    *,
    timeout: float = 120.0,
    api_key: str = "none",
) -> list[dict]:
    """Send every request of `trace` at its arrival (seconds from now), streamed; return one
    record per request: arrival and token_times (seconds from the start, for `summarize`),
    completion_tokens (the server's count, None if it gives none) and error (None if it
    finished). Requests still running after `timeout` seconds are cancelled (error
    "timeout")."""
    from openai import APIError, AsyncOpenAI

    check_loopback(base_url)
    check_int("requests in the trace", len(trace), low=1, high=MAX_REQUESTS)
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise KVLibValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    records = [
        dict(arrival=r.arrival, token_times=[], completion_tokens=None, error="timeout")
        for r in trace
    ]
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    start = time.perf_counter()

    async def send(req: TraceRequest, rec: dict) -> None:
        await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
        rec["arrival"] = time.perf_counter() - start  # when it was sent: TTFT counts from here
        try:
            stream = await client.completions.create(
                model=model,
                prompt=list(req.prompt),
                max_tokens=req.max_new_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            async for chunk in stream:
                if chunk.choices:  # the last chunk has only the usage
                    n = len(getattr(chunk.choices[0], "token_ids", None) or ()) or 1
                    rec["token_times"] += [time.perf_counter() - start] * n
                if chunk.usage is not None:
                    rec["completion_tokens"] = chunk.usage.completion_tokens
            rec["error"] = None
        except APIError as err:
            rec["error"] = f"{type(err).__name__}: {err}"

    async with client:
        tasks = [asyncio.create_task(send(r, rec)) for r, rec in zip(trace, records, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # over time: cancel (closing the stream cancels it on the server)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the loop above raises here, not silently
    return records


def report(records: list[dict]) -> dict:
    """`summarize`'s figures over the requests that finished, and what happened to the rest."""
    finished = [r for r in records if r["error"] is None]
    counted = [r["completion_tokens"] for r in finished if r["completion_tokens"] is not None]
    out = dict(
        sent=len(records),
        finished=len(finished),
        timed_out=sum(r["error"] == "timeout" for r in records),
        failed=sum(r["error"] not in (None, "timeout") for r in records),
        completion_tokens=sum(counted) if len(counted) == len(finished) else None,
    )
    if finished:
        out.update(summarize(finished))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvlib.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="a loopback server")
    p.add_argument("--model", default="kvlib-fortunes", help="the model id the server serves")
    p.add_argument("--num-requests", type=int, default=32, help=f"at most {MAX_REQUESTS}")
    p.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    p.add_argument("--vocab-size", type=int, default=1024, help="token ids are drawn below it")
    p.add_argument("--mean-prompt", type=float, default=48.0)
    p.add_argument("--mean-output", type=float, default=40.0)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--max-output", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_loopback(args.base_url)
        check_int("num_requests", args.num_requests, high=MAX_REQUESTS)
        trace = sharegpt_like(
            args.num_requests,
            args.rate,
            vocab_size=args.vocab_size,
            mean_prompt=args.mean_prompt,
            mean_output=args.mean_output,
            max_prompt=args.max_prompt,
            max_output=args.max_output,
            seed=args.seed,
        )
        records = asyncio.run(replay(args.base_url, args.model, trace, timeout=args.timeout))
    except KVLibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    figures = report(records)
    for key, value in figures.items():
        print(f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(args=_jsonable(args), figures=figures), indent=1))
    errors = [r["error"] for r in records if r["error"] not in (None, "timeout")]
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    return 0 if figures["finished"] == figures["sent"] else 1


def _jsonable(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


if __name__ == "__main__":
    sys.exit(main())
