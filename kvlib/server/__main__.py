"""python -m kvlib.server: the book's model behind an OpenAI-compatible API.

    python -m kvlib.server                      # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "kvlib-fortunes", "prompt": "A fool", "max_tokens": 20}'

It listens on loopback unless told otherwise (--host 0.0.0.0 serves the network: there is no
authentication). SIGINT (Ctrl-C) or SIGTERM ends it cleanly with status 0: open streams end
with finish_reason "abort", the engine thread stops, uvicorn closes.
"""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn

from kvlib.engine.core import Engine
from kvlib.errors import KVLibError, check_int
from kvlib.pretrained import load_pretrained
from kvlib.server.app import create_app
from kvlib.server.loop import EngineLoop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvlib.server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model-path",
        default=None,
        help="a kvlib.train output folder (default: the shipped model)",
    )
    p.add_argument(
        "--model-name", default=None, help="the id /v1/models lists (default: the config's name)"
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most requests running at once")
    p.add_argument("--max-num-tokens", type=int, default=256, help="token budget of one step")
    p.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks in the pool (default: enough for max-num-seqs full-length requests)",
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _stopped(signum, frame) -> None:
    raise SystemExit(0)  # a requested stop is a clean exit


class Server(uvicorn.Server):
    """uvicorn's server that, asked to exit, first ends the engine's streams (uvicorn waits
    for open connections to close before it runs the app's shutdown)."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop) -> None:
        super().__init__(config)
        self.engine_loop = engine_loop

    def handle_exit(self, sig, frame) -> None:
        self.engine_loop.stop()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # uvicorn takes these signals while it serves, then raises them again to the handlers it
    # found: these, so the process exits 0 and not as killed.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    try:
        check_int("port", args.port, low=0, high=65535)
        kw = {} if args.model_path is None else {"path": args.model_path}
        model, tokenizer = load_pretrained(**kw)
        P, S = check_int("block_size", args.block_size), model.config.max_seq_len
        num_blocks = args.num_blocks or check_int("max_num_seqs", args.max_num_seqs) * -(-S // P)
        engine = Engine(
            model,
            num_blocks=num_blocks,
            block_size=P,
            max_num_seqs=args.max_num_seqs,
            max_num_tokens=args.max_num_tokens,
            max_history=0,  # a server runs for days: keep no per-step records
        )
        app = create_app(engine, tokenizer, model_name=args.model_name)
    except KVLibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    Server(config, app.state.engine_loop).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
