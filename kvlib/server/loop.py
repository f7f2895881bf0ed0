"""`EngineLoop`: one thread owns the engine; requests come in and tokens go out through it.

The engine is not thread-safe, and an HTTP server answers many requests at once, each in its
own coroutine. So exactly one thread touches the engine. Everything else sends it commands
(add a request, cancel one, read something) through a queue, and it runs them between two
steps. While any request is unfinished it steps the engine; when none is, it sleeps on the
queue. After each step it hands every request its new token through that request's asyncio
queue (`loop.call_soon_threadsafe`, the one safe way into an event loop from another thread):

    coroutine --add/cancel--> command queue --> engine thread: step, step, ...
    coroutine <--Delta(token, finish_reason)-- asyncio queue <--/

A request's last Delta has its finish reason: "eos", "length", or "abort" when the loop
stops under it. The loop pops finished requests from the engine, so nothing grows with the
number of requests served (give the engine `max_history` too).

`stats()` reads the engine's KV cache figures in the engine thread (between two steps, so
they are consistent): the pool's size, its blocks in use and in the prefix index, the
preemptions, and the prefix cache's hit rate in prompt tokens. That rate counts each request
once, when it is first admitted (a request admitted again after a preemption is not counted
again), which is how vLLM counts `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import NamedTuple

from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.errors import KVLibValueError

log = logging.getLogger(__name__)


class Delta(NamedTuple):
    """What one step gave a request: its new token (None at an abort), and its finish reason
    when this is its last Delta (None before)."""

    token: int | None
    finish_reason: str | None


class LoopClosedError(KVLibValueError):
    """The engine loop is stopping or stopped: it takes no new request."""


_STOP = object()


class EngineLoop:
    """Runs `engine` in a thread of its own: `start`, then `add` and `cancel` from any
    coroutine, `call` from anywhere, `stop` (returns at once) and `join` to end it.

    If the engine itself fails (a bug), the loop ends every request ("abort") and closes:
    later requests are refused rather than left waiting.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (fn, future) or _STOP
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._lock = threading.Lock()  # orders `_closed` with the commands put before it
        self._thread = threading.Thread(target=self._run, name="kvlib-engine", daemon=True)
        # prefix cache over the requests admitted so far: prompt tokens looked up, found cached
        self._queried_tokens = self._hit_tokens = 0
        self._admitted: set[int] = set()  # ids of unfinished requests counted already

    # ---- the other threads' side ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) in the engine thread between two steps; a future of its result.
        Raises LoopClosedError once the loop is stopping."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise LoopClosedError("the server is shutting down: it takes no new request")
            self._commands.put((fn, done))
        return done

    async def add(self, prompt: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request; return its id and the asyncio queue its Deltas will arrive on.
        Raises what `Engine.add_request` raises (nothing is queued then)."""
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()

        def add(engine: Engine) -> int:
            rid = engine.add_request(prompt, params)
            self._streams[rid] = (loop, deltas)
            return rid

        return await asyncio.wrap_future(self.call(add)), deltas

    def cancel(self, request_id: int) -> None:
        """Stop a request and free its blocks (nothing if it finished already); returns at once."""
        with contextlib.suppress(LoopClosedError):  # a stopping loop cancels everything itself
            self.call(lambda engine: self._drop(request_id, None))

    def stats(self) -> concurrent.futures.Future:
        """A future of the engine's KV cache figures (a dict; see the module docstring), read
        in the engine thread. Raises LoopClosedError once the loop is stopping."""
        return self.call(self._stats)

    def stop(self) -> None:
        """Ask the thread to end every request ("abort") and exit; returns at once (safe from a
        signal handler). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._commands.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug in the engine: nothing it holds can be trusted any more
            log.exception("the engine failed; the server takes no more requests")
            with self._lock:
                self._closed = True
            for rid in self._streams:
                self._send(rid, Delta(None, "abort"))
            self._streams.clear()
        finally:  # commands that came too late
            while not self._commands.empty():
                command = self._commands.get()
                if command is not _STOP:
                    command[1].set_exception(LoopClosedError("the engine loop has stopped"))

    def _serve(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:  # every command that is waiting, then one step
                if command is _STOP:
                    for rid in list(self._streams):
                        self._drop(rid, Delta(None, "abort"))
                    return
                fn, done = command
                try:
                    done.set_result(fn(self.engine))
                except Exception as err:  # the caller's (a request that cannot run): theirs to see
                    done.set_exception(err)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                self._step()

    def _step(self) -> None:
        out = self.engine.step()
        for rid, _ in out.scheduled:  # a request's first step is its admission
            if rid not in self._admitted:
                self._admitted.add(rid)
                req = self.engine.requests[rid]
                self._queried_tokens += len(req.prompt)
                self._hit_tokens += req.num_cached
        for rid, token in out.tokens.items():
            finished = rid in out.finished
            reason = self.engine.requests[rid].finish_reason if finished else None
            self._send(rid, Delta(token, reason))
            if finished:
                self.engine.pop(rid)
                del self._streams[rid]
                self._admitted.discard(rid)

    def _drop(self, rid: int, last: Delta | None) -> None:
        """Cancel request `rid` in the engine, forget it, and send it `last` (if any)."""
        if rid not in self.engine.requests:
            return  # finished and popped already
        self.engine.cancel(rid)
        self.engine.pop(rid)
        self._admitted.discard(rid)
        if last is not None:
            self._send(rid, last)
        self._streams.pop(rid, None)

    def _stats(self, engine: Engine) -> dict:
        pool, scheduler = engine.pool, engine.scheduler
        queried, hits = self._queried_tokens, self._hit_tokens
        return dict(
            block_size=pool.block_size,
            num_blocks=pool.num_blocks,
            blocks_used=pool.num_used,
            blocks_cached=pool.num_cached,
            prefix_cache=pool.prefix_cache,
            prefix_cache_queries=queried,  # prompt tokens of the requests admitted
            prefix_cache_hits=hits,  # of those, tokens found in the prefix cache
            prefix_hit_rate=hits / queried if queried else 0.0,
            preemptions=scheduler.stats["preemptions"],
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(scheduler.swapped),
            steps=engine.num_steps,
        )

    def _send(self, rid: int, delta: Delta) -> None:
        loop, deltas = self._streams[rid]
        with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody listens
            loop.call_soon_threadsafe(deltas.put_nowait, delta)
