"""`specialize serve`: an OpenAI-compatible HTTP server for a run.

    specialize serve --model runs/faq --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "faq", "messages": [{"role": "user", "content": "How do I reset my password?"}]}'

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streaming or not), `POST
/v1/completions` (raw prompt, no template), `GET /health`. Chat prompts are rendered by the
run's own template, so answers equal `specialize generate`; greedy unless `temperature` > 0.

One worker thread owns the model: requests wait in a bounded queue, and waiting requests with
equal sampling settings are generated together in one batch. A full queue answers 503 at once
rather than letting latency grow without bound. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`; tracebacks stay in the server log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from specialize.chat import context_length, stream_answer
from specialize.config import ServeConfig
from specialize.errors import UserError
from specialize.generate import Completion, Generator

logger = logging.getLogger("specialize.serve")
DEFAULT_MAX_TOKENS = 256  # answer budget when a request sets none (clipped to the context window)
PositiveInt = Annotated[int, Field(gt=0, strict=True)]  # strict: `true` or `1.5` is not a token count


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
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

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


# ----------------------------------------------------------------------------- the model worker

def generate_ids(generator: Generator, prompts: list[list[int]], max_tokens: list[int], temperature: float,
                 top_p: float, stop: list[str], seed: int | None) -> list[Completion]:
    """`Generator.generate` for prompts already rendered to token ids, each with its own budget.

    Same left padding, sampling arguments and finishing as `Generator.generate`, so answers
    match it; the batch runs to the largest budget and each answer is cut to its own.
    """
    if seed is not None:
        torch.manual_seed(seed)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), generator.pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    kwargs = generator._sampling(max(max_tokens), temperature, top_p, stop or None)
    with torch.inference_mode():
        output = generator.model.generate(input_ids=input_ids.to(generator.device),
                                          attention_mask=attention.to(generator.device), **kwargs)
    new_tokens = output[:, width:].tolist()  # (B, new)
    return [generator._finish(new_tokens[row][:budget], len(ids), budget, stop or None)
            for row, (ids, budget) in enumerate(zip(prompts, max_tokens))]


@dataclass
class Job:
    """One request waiting for the model. Jobs with equal `sampling` may share a batch."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple  # (temperature, top_p, stop, seed), normalised so that equal means batchable
    on_text: Callable[[str], None] | None = None  # streaming: gets each piece of text, in the worker thread
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    pass


class Worker:
    """The one thread that touches the model, draining a bounded queue of jobs in batches."""

    def __init__(self, generator: Generator, max_batch_size: int, max_queue: int):
        self.generator, self.max_batch_size, self.max_queue = generator, max_batch_size, max_queue
        self._pending: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="specialize-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self._closed or len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._lock.notify()
        return job.future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._lock.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        """The oldest job plus waiting jobs with the same settings (streams and seeded sampling alone)."""
        with self._lock:
            while True:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if first.future.set_running_or_notify_cancel():  # False: its client gave up
                    break
            batch = [first]
            if first.on_text is not None or first.sampling[3] is not None:
                return batch  # a stream, or seeded sampling that must not depend on its neighbours
            for job in [j for j in self._pending if j.on_text is None and j.sampling == first.sampling]:
                if len(batch) >= self.max_batch_size:
                    break
                self._pending.remove(job)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                temperature, top_p, stop, seed = batch[0].sampling
                if batch[0].on_text is not None:
                    job = batch[0]
                    results = [stream_answer(self.generator, job.prompt_ids, job.on_text, max_new_tokens=job.max_tokens,
                                             temperature=temperature, top_p=top_p, stop=list(stop),
                                             cancelled=job.cancelled.is_set)]
                else:
                    results = generate_ids(self.generator, [j.prompt_ids for j in batch],
                                           [j.max_tokens for j in batch], temperature, top_p, list(stop), seed)
                for job, result in zip(batch, results):
                    job.future.set_result(result)
            except Exception as e:  # the request handlers re-raise it; the middleware logs the traceback
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)


# ----------------------------------------------------------------------------- HTTP

class _Gate:
    """ASGI middleware: API key check, one log line per request, and no traceback to clients.

    The log line has method, path, status, token counts and latency; message contents only
    with `log_contents`, and never the key.
    """

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    def _authorised(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), scope.setdefault("state", {})
        status = 0

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and not self._authorised(scope):
                await APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                               code="invalid_api_key").response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception:
            logger.exception("internal error in %s %s", scope["method"], scope["path"])
            if status == 0:  # nothing sent yet: the client gets a generic 500, never the traceback
                await APIError(500, "internal server error", "server_error").response()(scope, receive, send_and_note)
            status = status or 500
        finally:
            usage = state.get("usage")
            tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" if usage else ""
            logger.info("%s %s %d%s %.3fs", scope["method"], scope["path"], status, tokens,
                        time.perf_counter() - start)


def _chunk(kind: str, rid: str, created: int, name: str, piece: str | None = None, finish: str | None = None,
           role: bool = False) -> str:
    """One server-sent event in OpenAI's chunk format."""
    if kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": piece} if piece else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        obj = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
    return f"data: {json.dumps(obj)}\n\n"


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def served_name(ref: str) -> str:
    """The name in /v1/models: a local run's folder name, or the hub id as given."""
    return Path(ref).resolve().name if Path(ref).exists() else ref


def create_app(generator: Generator, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `generator`; starts its worker thread (stopped at app shutdown)."""
    name = cfg.model_name or served_name(cfg.model or "model")
    key = cfg.api_key or os.environ.get("SPECIALIZE_API_KEY") or None
    context = context_length(generator)
    worker = Worker(generator, cfg.max_batch_size, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="specialize", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(_Gate, key=key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        if err.get("type") == "json_invalid":
            return APIError(400, f"request body is not valid JSON: {err.get('msg', '')}").response()
        message = f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid request")
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    def check_model(requested: str | None) -> None:
        if requested and requested != name:
            raise APIError(404, f"model '{requested}' is not served here (this server has '{name}')",
                           param="model", code="model_not_found")

    def budget(requested: int | None, prompt_tokens: int) -> int:
        """Tokens the answer may have: as requested, else the default, within the context window."""
        if context is None:
            return requested or DEFAULT_MAX_TOKENS
        room = context - prompt_tokens
        if room <= 0 or (requested or 0) > room:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested or 1}) exceeds "
                                f"the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return requested or min(DEFAULT_MAX_TOKENS, room)

    async def answer(request: Request, body: SamplingRequest, kind: str, ids: list[int], max_tokens: int | None,
                     contents):
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        temperature = body.temperature if body.temperature is not None else 0.0
        greedy = temperature == 0  # top_p and seed change nothing when greedy: one batch for all
        sampling = (0.0, 1.0, tuple(body.stop_list()), None) if greedy else \
            (temperature, body.top_p or 1.0, tuple(body.stop_list()), body.seed)
        job = Job(ids, budget(max_tokens, len(ids)), sampling)
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        if body.stream:
            job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        try:
            future = worker.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry shortly", "server_error",
                           code="queue_full") from None

        def note(completion: Completion) -> None:
            request.state.usage = _usage(completion)
            if cfg.log_contents:
                logger.info("contents %s: %s -> %r", rid, json.dumps(contents), completion.text)

        if not body.stream:
            completion = await asyncio.wrap_future(future)
            note(completion)
            choice = {"index": 0, "finish_reason": completion.finish_reason, "logprobs": None}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": completion.text}
                obj = "chat.completion"
            else:
                choice["text"] = completion.text
                obj = "text_completion"
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
                    "usage": _usage(completion)}

        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))

        async def events():
            try:
                if kind == "chat":
                    yield _chunk(kind, rid, created, name, role=True)
                while (piece := await pieces.get()) is not None:
                    yield _chunk(kind, rid, created, name, piece)
                completion = future.result()
                note(completion)
                yield _chunk(kind, rid, created, name, finish=completion.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    usage = {"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                             "usage": _usage(completion)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception:  # headers are sent: report in-stream, as OpenAI does
                logger.exception("internal error while streaming %s", rid)
                error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            finally:  # also when the client disconnects: stop generating for nobody
                job.cancelled.set()
                future.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": worker.waiting}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specialize"}]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "specialize"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [m.as_dict() for m in body.messages]
        try:
            ids = generator.prompt_ids(messages)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the run's chat template rejects these messages: {e}", param="messages") from None
        return await answer(request, body, "chat", ids, body.max_tokens or body.max_completion_tokens, messages)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        ids = generator.tokenizer(prompt)["input_ids"]  # raw text, with the special tokens the tokenizer adds
        return await answer(request, body, "text", ids, body.max_tokens, prompt)

    return app


def _log_config() -> dict:
    """uvicorn's logging, plus our logger on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config["loggers"]["specialize"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(cfg: ServeConfig) -> None:
    """Load the run and serve it until Ctrl-C."""
    import uvicorn

    if not cfg.model:
        raise UserError("no model given (use --model RUN)")
    try:  # bind first, so a busy port is one clear line rather than a uvicorn traceback
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    generator = Generator.load(cfg.model, trust_remote_code=cfg.trust_remote_code)
    app = create_app(generator, cfg)
    keyed = bool(cfg.api_key or os.environ.get("SPECIALIZE_API_KEY"))
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not keyed:
        logger.warning("listening on %s without an API key: anyone who can reach it can use the model "
                       "(set --api-key or SPECIALIZE_API_KEY)", cfg.host)
    print(f"serving '{cfg.model_name or served_name(cfg.model)}' at http://{cfg.host}:{cfg.port}/v1 "
          f"(API key {'required' if keyed else 'not required'}); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=_log_config(), access_log=False))
    server.run(sockets=[sock])
