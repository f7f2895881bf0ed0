"""An OpenAI-compatible HTTP server on kvlib's serving engine (`python -m kvlib.server`).

One concept per module, lowest first:

    text       token ids -> text a piece at a time (whole UTF-8 characters only), stop strings
    protocol   the request body of /v1/completions and OpenAI's error object
    loop       `EngineLoop`: one thread owns the engine, steps it, hands each request its tokens
    app        the FastAPI app: /v1/completions (plain and streamed), /v1/models,
               /v1/kvlib/stats (the KV cache figures)
    __main__   the command line: load the book's model, build an engine, run uvicorn

This package's `__init__` imports nothing (`import kvlib` never needs FastAPI); install the
`serve` extra (`pip install kvlib[serve]`) to run it.
"""
