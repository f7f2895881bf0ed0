"""The FastAPI app: OpenAI's /v1/completions (plain and streamed) and /v1/models on an Engine.

    app = create_app(Engine(model, num_blocks=256, block_size=16, max_history=0), tokenizer)
    uvicorn.run(app)                       # or: python -m kvlib.server

A completion request becomes one engine request (`EngineLoop.add`); its tokens come back one
Delta per engine step. Plain, the response waits for the last one. Streamed (`stream: true`),
each token is one server-sent event `data: {...}\\n\\n` whose text is the characters that
token completed ("" while a character's bytes are still arriving, `kvlib.server.text`), and
`data: [DONE]\\n\\n` ends the stream. A client that goes away mid-stream cancels its request
in the engine, which frees its blocks at once.

GET /v1/kvlib/stats (kvlib's own, not OpenAI's) answers the engine's KV cache figures as JSON
(`EngineLoop.stats`: block size, blocks, prefix cache hit rate in tokens, preemptions), what
vLLM's Prometheus /metrics tells about its own cache.

Errors are OpenAI's error object with status 400 (a bad body, bad values, a prompt that does
not fit the model), 404 (an unknown model) or 503 (the server is shutting down).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from kvlib.data import BPETokenizer
from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.errors import KVLibValueError
from kvlib.server.loop import Delta, EngineLoop, LoopClosedError
from kvlib.server.protocol import CompletionRequest, error_body
from kvlib.server.text import IncrementalDecoder, StopStrings

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


class APIError(Exception):
    """An error the client caused (or a refusal): answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param=None, code=None, type_=None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")


def create_app(engine: Engine, tokenizer: BPETokenizer, *, model_name: str | None = None):
    """A FastAPI app serving `engine` (which nothing else may touch once the app starts) with
    `tokenizer`'s text; /v1/models lists `model_name` (default: the model config's name)."""
    if tokenizer.vocab_size != engine.model.config.vocab_size:
        V = engine.model.config.vocab_size
        raise KVLibValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {V}")
    name = model_name or engine.model.config.name
    engine_loop = EngineLoop(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:  # streams still open end with finish_reason "abort"
            engine_loop.stop()
            engine_loop.join(timeout=10)

    app = FastAPI(title="kvlib", lifespan=lifespan)
    app.state.engine_loop = engine_loop  # for the command line's signal handler, and tests
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        body = error_body(str(err), err.type, err.param, err.code)
        return JSONResponse(body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return JSONResponse(error_body(message, code="json_invalid"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        body = error_body(message, param=loc[0] if loc else None, code=first.get("type"))
        return JSONResponse(body, status_code=400)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "kvlib"}
        card["max_model_len"] = engine.model.config.max_seq_len
        return {"object": "list", "data": [card]}

    @app.get("/v1/kvlib/stats")
    async def stats() -> dict:
        try:
            return await asyncio.wrap_future(engine_loop.stats())
        except LoopClosedError as err:
            raise APIError(503, str(err)) from err

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt, params, stops = _check(body, name, tokenizer, engine.model.config.max_seq_len)
        try:
            rid, deltas = await engine_loop.add(prompt, params)
        except LoopClosedError as err:
            raise APIError(503, str(err)) from err
        except KVLibValueError as err:  # e.g. more blocks than the whole pool
            raise APIError(400, str(err), param="max_tokens") from err
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion")
        head.update(created=int(time.time()), model=name)
        pieces = _pieces(rid, deltas, engine_loop, tokenizer, stops)
        if not body.stream:
            text, n, reason = "", 0, None
            async for piece, counted, finish in pieces:
                text, n, reason = text + piece, n + counted, finish or reason
            choice = dict(text=text, index=0, logprobs=None, finish_reason=reason)
            return dict(head, choices=[choice], usage=_usage(len(prompt), n))
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events():
            n = 0
            async for piece, counted, finish in pieces:
                n += counted
                choice = dict(text=piece, index=0, logprobs=None, finish_reason=finish)
                yield _sse(dict(head, choices=[choice]))
            if include_usage:
                yield _sse(dict(head, choices=[], usage=_usage(len(prompt), n)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _check(body: CompletionRequest, name: str, tokenizer: BPETokenizer, max_seq_len: int):
    """(prompt ids, SamplingParams, stop strings) of a valid body; else raise APIError."""
    if body.model != name:
        message = f"The model `{body.model}` does not exist; this server serves `{name}`"
        raise APIError(404, message, param="model", code="model_not_found")
    refused = body.unsupported()
    if refused:
        raise APIError(400, refused[1], param=refused[0])
    if isinstance(body.prompt, str):
        prompt = tokenizer.encode(body.prompt)
    else:
        prompt = body.prompt
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            message = f"prompt token ids must be in [0, {tokenizer.vocab_size}), got {bad[:5]}"
            raise APIError(400, message, param="prompt")
    if not prompt:
        raise APIError(400, "prompt must not be empty (a string or a list of token ids)", "prompt")
    if len(prompt) + body.max_tokens > max_seq_len:
        message = (
            f"This model's maximum context length is {max_seq_len} tokens, but you asked for "
            f"{len(prompt) + body.max_tokens}: {len(prompt)} in the prompt and {body.max_tokens} "
            "for the completion (max_tokens). Shorten the prompt or lower max_tokens."
        )
        raise APIError(400, message, param="max_tokens", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise APIError(400, f"stop strings must be non-empty, got {stops!r}", param="stop")
    params = SamplingParams(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=None if body.top_k in (None, -1) else body.top_k,
        top_p=None if body.top_p == 1.0 else body.top_p,
        seed=body.seed,
        eos_token_id=None if body.ignore_eos else tokenizer.eot_id,
    )
    return prompt, params, stops


async def _pieces(rid, deltas, engine_loop: EngineLoop, tokenizer: BPETokenizer, stops):
    """(text, tokens counted, finish reason or None) for each token of request `rid`: its
    text decoded incrementally and cut at a stop string. If the consumer stops early (a
    client that went away), the request is cancelled in the engine."""
    decoder, stop = IncrementalDecoder(tokenizer), StopStrings(stops)
    finish = None
    try:
        while finish is None:
            delta: Delta = await deltas.get()
            text = "" if delta.token is None else decoder.push(delta.token)
            finish = FINISH_REASONS[delta.finish_reason] if delta.finish_reason else None
            if finish is not None:
                text += decoder.flush()
            text, stopped = stop.push(text)
            if stopped:
                finish = "stop"
                engine_loop.cancel(rid)  # it may have more tokens to make: they are not wanted
            elif finish is not None:
                text += stop.flush()
            yield text, int(delta.token is not None), finish
    finally:
        if finish is None:
            engine_loop.cancel(rid)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
