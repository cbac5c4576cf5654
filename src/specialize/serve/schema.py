"""The OpenAI wire format `specialize serve` speaks: request bodies, responses, stream chunks, errors.

Request bodies are pydantic models that ignore unknown fields (`user`, `presence_penalty`, ...)
as OpenAI-compatible servers do; a body that fails validation becomes a 400 in OpenAI's error
shape, `{"error": {"message", "type", "param", "code"}}` (see `APIError`).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from specialize.generate import Completion

PositiveInt = Annotated[int, Field(gt=0, strict=True)]  # strict: `true` or `1.5` is not a token count
MAX_STOPS = 4  # OpenAI's limit; each stop string is matched after every generated token
MAX_STOP_CHARS = 64


# ----------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # Unknown fields (user, presence_penalty, ...) are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        """A string, or OpenAI's list of text parts (joined); images and audio are not supported."""
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return content

    def as_dict(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = 1  # null means the default, 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return 1

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are supported, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None  # the newer name for max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt


# ----------------------------------------------------------------------------- responses

class APIError(Exception):
    """An error a client should see, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def usage_of(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def completion_body(kind: str, rid: str, created: int, name: str, c: Completion) -> dict:
    """A whole (non-streamed) answer: `chat.completion` for kind "chat", else `text_completion`."""
    choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": c.text}
    else:
        choice["text"] = c.text
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": name, "choices": [choice], "usage": usage_of(c)}


def stream_chunk(kind: str, rid: str, created: int, name: str, piece: str | None = None, finish: str | None = None,
                 role: bool = False, usage_null: bool = False) -> str:
    """One server-sent event in OpenAI's chunk format.

    Args:
        usage_null: the client asked for `stream_options.include_usage`: as OpenAI does, every chunk
            carries `"usage": null` and only the last one (`usage_chunk`) the counts.
    """
    if kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": piece} if piece else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        obj = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
    if usage_null:
        obj["usage"] = None
    return f"data: {json.dumps(obj)}\n\n"


def usage_chunk(kind: str, rid: str, created: int, name: str, c: Completion) -> str:
    """The last event when the client asked for `stream_options.include_usage`: no choices, only usage."""
    obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": name, "choices": [], "usage": usage_of(c)}
    return f"data: {json.dumps(obj)}\n\n"


def error_chunk() -> str:
    """An error after the headers went out: reported in-stream, as OpenAI does, without internals."""
    error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"
