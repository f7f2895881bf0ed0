"""The request body of POST /v1/completions, and OpenAI's error object.

Fields follow OpenAI's completions API; `top_k` and `ignore_eos` are the extensions vLLM
accepts too (a load generator sends `ignore_eos` so outputs have the lengths it asked for).
Values are checked strictly (a string is not a number, true is not 1); what pydantic cannot
say (a prompt too long for the model, a token outside the vocabulary) the app checks.
Fields of OpenAI's API that kvlib does not serve (`n` > 1, `logprobs`, `echo`, ...) are
refused by name, never ignored; unknown fields (`user`, ...) are ignored, as OpenAI does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or None: no top-k (vLLM's convention)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # OpenAI fields kvlib does not serve: only their defaults are accepted.
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field set to something kvlib cannot do, else None."""
        if self.n != 1:
            return "n", f"n must be 1: kvlib's server returns one choice per request, got {self.n}"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of is not supported (only 1), got {self.best_of}"
        if self.logprobs is not None:
            return "logprobs", "logprobs is not supported by kvlib's server"
        if self.echo:
            return "echo", "echo is not supported by kvlib's server"
        if self.suffix is not None:
            return "suffix", "suffix is not supported by kvlib's server"
        return None


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
