"""The OpenAI wire format `specialize serve` speaks: request bodies, responses, stream chunks, errors.

Request bodies are pydantic models that ignore fields without effect on the answer (`user`,
`metadata`, ...) as OpenAI-compatible servers do; a setting that would change the answer but cannot be
honoured (`logit_bias`, penalties, `n` > 1) is refused; a body that fails validation becomes a 400 in OpenAI's error
shape, `{"error": {"message", "type", "param", "code"}}` (see `APIError`).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specialize.generate import Completion

PositiveInt = Annotated[int, Field(gt=0, strict=True)]  # strict: `true` or `1.5` is not a token count
MAX_STOPS = 4  # OpenAI's limit; each stop string is matched after every generated token
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs
MAX_LEGACY_LOGPROBS = 5  # and for the completions API's logprobs


# ----------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # Unknown fields (user, metadata, ...) are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns: the call this result answers
    # None only for an assistant turn that calls tools (fields above are validated first: it can tell)
    content: str | None = Field(None, validate_default=True)

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        """A string, or OpenAI's list of text parts (joined); images and audio are not supported."""
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return content

    @field_validator("content")
    @classmethod
    def _given(cls, content: str | None, info):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return content

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def as_dict(self) -> dict:
        """The message in OpenAI's shape, without unset fields (tools.template_messages readies it for a template)."""
        return self.model_dump(exclude_none=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    model: str | None = None
    # Settings this server cannot honour: a 400 when set to anything but their neutral value, never ignored.
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
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

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server (leave it unset)")
        return value

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]


class JSONSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # enforced either way: the grammar allows only what the schema allows


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object: {\"name\": ..., \"schema\": {...}}")
        return self


class NamedTool(_Body):
    type: Literal["function"]
    function: dict  # {"name": ...}: checked against the request's tools

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict) -> dict:
        if not isinstance(function.get("name"), str):
            raise ValueError("tool_choice.function needs a name")
        return function


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None  # the newer name for max_tokens
    tools: list | None = None  # checked by tools.check_tools, so every problem has its own message
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None  # None: True, as OpenAI
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    functions: list | None = None  # the deprecated form of tools
    function_call: str | dict | None = None

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, value, info):
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported; use tools and tool_choice")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _logprobs_on(cls, top: int | None, info) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS, strict=True)  # the legacy API's top-k
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt


def invalid_request(errors: list[dict]) -> APIError:
    """The first of pydantic's validation errors as a 400, naming the field (`messages.0.content`)."""
    err = errors[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    if err.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err.get('msg', '')}")
    msg = err.get("msg", "invalid").removeprefix("Value error, ")  # pydantic's prefix for our own checks
    message = f"{param}: {msg}" if param else msg
    return APIError(400, message, param=param)


def parsed(model: type[BaseModel], raw: bytes):
    """The request body as `model`; a 400 naming the first field that is wrong."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_request(e.errors(include_input=False)) from None


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


def chat_logprobs(entries: list, token_bytes) -> dict:
    """Chat's `choice.logprobs`: per token its text, log-probability, UTF-8 bytes and the likeliest alternatives."""
    def one(token: int, logprob: float) -> dict:
        raw = token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    content = [one(token, logprob) | {"top_logprobs": [one(t, lp) for t, lp in top]} for token, logprob, top in entries]
    return {"content": content, "refusal": None}


def text_logprobs(entries: list, token_bytes, offset: int = 0) -> dict:
    """The completions API's legacy `choice.logprobs`: tokens, their log-probabilities, the top-k (and the
    chosen token) per position, and where each token starts in the text (from `offset`)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        text = token_bytes(token).decode("utf-8", errors="replace")
        tokens.append(text)
        logprobs.append(logprob)
        tops.append({token_bytes(t).decode("utf-8", errors="replace"): lp for t, lp in top} | {text: logprob})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def completion_body(kind: str, rid: str, created: int, name: str, c: Completion, message: dict | None = None,
                    finish: str | None = None, logprobs: dict | None = None) -> dict:
    """A whole (non-streamed) answer: `chat.completion` for kind "chat", else `text_completion`.

    Args:
        message: the chat message when it is more than the text (tool calls); finish: overrides c's.
    """
    choice = {"index": 0, "finish_reason": finish or c.finish_reason, "logprobs": logprobs}
    if kind == "chat":
        choice["message"] = message or {"role": "assistant", "content": c.text}
    else:
        choice["text"] = c.text
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": name, "choices": [choice], "usage": usage_of(c)}


def stream_chunk(kind: str, rid: str, created: int, name: str, piece: str | None = None, finish: str | None = None,
                 role: bool = False, usage_null: bool = False, tool_calls: list[dict] | None = None,
                 logprobs: dict | None = None) -> str:
    """One server-sent event in OpenAI's chunk format.

    Args:
        usage_null: the client asked for `stream_options.include_usage`: as OpenAI does, every chunk
            carries `"usage": null` and only the last one (`usage_chunk`) the counts.
        tool_calls: chat deltas of whole calls, each with its `index` among the answer's calls.
    """
    if kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": piece} if piece else {})
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": logprobs}
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
