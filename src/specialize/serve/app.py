"""The HTTP side of `specialize serve`: FastAPI routes, API key check, request log, `serve()`.

Routes parse the body, render chat prompts with the run's own template and tokenise them in a
worker thread, never in the event loop (a large body would otherwise stall every client and
/health), check the token budget against the server's cap and the context window, and hand a
`Job` to the one model `Worker`; a streamed answer's pieces travel from the worker thread to the
event loop through an asyncio queue.
While a request waits, its connection is polled: a client that goes away has its job dropped
from the queue, or stopped if it runs. Tracebacks stay in the server log; clients only ever
see OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from specialize.config import ServeConfig
from specialize.errors import UserError
from specialize.generate import Completion, Generator
from specialize.serve import tools as tooling
from specialize.serve.constrained import Grammars
from specialize.serve.gate import CLIENT_GONE, CancellingStream, ClientGone, Gate, unless_gone
from specialize.serve.limits import BodyLimit, deadline_protocol
from specialize.serve.schema import (APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest,
                                     chat_logprobs, completion_body, error_chunk, invalid_request, parsed,
                                     stream_chunk, text_logprobs, usage_chunk, usage_of)
from specialize.serve.worker import Job, QueueFull, Sampling, Worker, WorkerFailed

logger = logging.getLogger("specialize.serve")
DEFAULT_MAX_TOKENS = 256  # answer budget when a request sets none (clipped to the cap and the context window)
# A prompt longer than this many characters per token of context cannot fit: it is refused before
# tokenising (which would cost seconds and gigabytes for megabytes of text). Real text averages
# 3-5 characters per token; no tokenizer averages 32 over a whole prompt.
MAX_CHARS_PER_TOKEN = 32


def served_name(ref: str) -> str:
    """The name in /v1/models: a local run's folder name, or the hub id as given."""
    return Path(ref).resolve().name if Path(ref).exists() else ref


def create_app(generator: Generator, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `generator`; starts its worker thread (stopped at app shutdown)."""
    name = cfg.model_name or served_name(cfg.model or "model")
    key = cfg.api_key or os.environ.get("SPECIALIZE_API_KEY") or None
    context = generator.context_length
    worker = Worker(generator, cfg.max_batch_size, cfg.max_queue)
    grammars = Grammars(generator)  # llguidance's view of the tokenizer: built on the first request that needs it
    max_chars = context * MAX_CHARS_PER_TOKEN if context is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The model and its libraries are ~400k objects that live as long as the server. Frozen, the
        # garbage collector stops walking them on every full collection, which parsing a request of
        # 100k tiny messages triggers again and again: 2 s to parse it, with the GIL (and so /health)
        # held up to 0.8 s at a time, become 0.8 s and 0.1 s.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await asyncio.to_thread(worker.close)

    app = FastAPI(title="specialize", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(Gate, key=key, health_open=cfg.health_open)  # outermost: runs first

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return invalid_request(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    def check_model(requested: str | None) -> None:
        if requested and requested != name:
            raise APIError(404, f"model '{requested}' is not served here (this server has '{name}')",
                           param="model", code="model_not_found")

    def budget(requested: int | None, prompt_tokens: int) -> int:
        """Tokens the answer may have: as requested, else the default, within the server's cap and the context.

        A request above `cfg.max_new_tokens` is refused (400), not clipped: clipped, a client asking
        for 4,000 tokens would get 1,024 with finish_reason "length" and no hint that the server,
        not its own max_tokens, cut the answer. OpenAI refuses too large a max_tokens the same way.
        """
        if requested is not None and requested > cfg.max_new_tokens:
            raise APIError(400, f"max_tokens ({requested}) is above this server's limit of {cfg.max_new_tokens} "
                                f"tokens per answer", param="max_tokens", code="invalid_value")
        default = min(DEFAULT_MAX_TOKENS, cfg.max_new_tokens)
        if context is None:
            return requested or default
        room = context - prompt_tokens
        if room <= 0 or (requested or 0) > room:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested or 1}) exceeds "
                                f"the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return requested or min(default, room)

    def logprobs_of(kind: str, entries: list | None, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return chat_logprobs(entries, grammars.token_bytes) if kind == "chat" else \
            text_logprobs(entries, grammars.token_bytes, offset)

    async def answer(request: Request, body: SamplingRequest, kind: str, ids: list[int], max_tokens: int | None,
                     contents, options: dict | None = None, parse_calls: frozenset[str] | bool = False):
        """Generate for one request. `options` are the Job's grammar, logprobs and end settings; `parse_calls`:
        the answer's tool calls become `tool_calls` (and finish_reason "tool_calls")."""
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        sampling = Sampling.of(body.temperature, body.top_p, body.stop_list(), body.seed)
        job = Job(ids, budget(max_tokens, len(ids)), sampling, **(options or {}))
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        if body.stream:
            job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
            if job.top_logprobs is not None:  # a list before its piece: the logprobs of the piece's tokens
                job.on_logprobs = lambda entries: loop.call_soon_threadsafe(pieces.put_nowait, entries)
        try:
            future = worker.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry shortly", "server_error",
                           code="queue_full") from None
        except WorkerFailed:
            raise APIError(503, "the server can no longer generate and needs a restart", "server_error",
                           code="server_unusable") from None

        def note(completion: Completion) -> None:
            request.state.usage = usage_of(completion)
            if cfg.log_contents:
                logger.info("contents %s: %s -> %r", rid, json.dumps(contents), completion.text)

        if not body.stream:
            try:
                completion = await unless_gone(request, asyncio.wrap_future(future))
            except ClientGone:
                return Response(status_code=CLIENT_GONE)
            finally:  # gone, or this handler cancelled: free the queue slot, stop generating for nobody
                if not future.done():
                    worker.cancel(job)
            note(completion)
            logprobs = logprobs_of(kind, completion.logprobs)
            if not parse_calls:
                return completion_body(kind, rid, created, name, completion, logprobs=logprobs)
            content, calls = tooling.reply(completion.text, parse_calls)
            message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
            return completion_body(kind, rid, created, name, completion, message,
                                   tooling.finish_reason(completion, calls), logprobs)

        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        usage = bool(body.stream_options and body.stream_options.include_usage)

        calls = tooling.ToolStream(parse_calls) if parse_calls else None
        sent = {"calls": 0, "logprobs": 0, "chars": 0}

        def chunks(parts: list, entries: list | None) -> list[str]:
            """Events for content pieces and calls; the first carries the logprobs that came with them."""
            out = []
            for part in parts:
                lp = logprobs_of(kind, entries, sent["chars"]) if entries else None
                if isinstance(part, str):
                    out.append(stream_chunk(kind, rid, created, name, part, usage_null=usage, logprobs=lp))
                    sent["chars"] += len(part)
                else:
                    delta = {"index": sent["calls"], "id": part["id"], "type": "function", "function": part["function"]}
                    out.append(stream_chunk(kind, rid, created, name, tool_calls=[delta], usage_null=usage,
                                            logprobs=lp))
                    sent["calls"] += 1
                if entries:
                    sent["logprobs"] += len(entries)
                    entries = None
            return out

        async def events():
            try:
                if kind == "chat":
                    yield stream_chunk(kind, rid, created, name, role=True, usage_null=usage)
                entries: list = []  # logprobs that arrived for the next piece
                while (piece := await unless_gone(request, asyncio.ensure_future(pieces.get()))) is not None:
                    if isinstance(piece, list):
                        entries += piece
                        continue
                    parts = calls.feed(piece) if calls is not None else [piece]
                    for event in chunks(parts, entries):
                        yield event
                    if parts:
                        entries = []
                completion = future.result()
                note(completion)
                for event in chunks(calls.finish() if calls is not None else [], entries):
                    yield event
                rest = completion.logprobs[sent["logprobs"]:] if completion.logprobs is not None else None
                yield stream_chunk(kind, rid, created, name, usage_null=usage,
                                   finish=tooling.finish_reason(completion, [None] * sent["calls"]),
                                   logprobs=logprobs_of(kind, rest, sent["chars"]) if rest else None)
                if usage:
                    yield usage_chunk(kind, rid, created, name, completion)
                yield "data: [DONE]\n\n"
            except ClientGone:
                pass  # the response's on_close cancels the job
            except Exception:  # headers are sent: report in-stream, as OpenAI does
                logger.exception("internal error while streaming %s", rid)
                yield error_chunk()

        # on_close: however the stream ends, a job still waiting or running is cancelled
        return CancellingStream(events(), on_close=lambda: worker.cancel(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health(request: Request):
        """200 while the worker can answer; 503 once it cannot (a poisoned device, a dead thread).

        Asked without the key (--health-open), the answer is the status alone: no model, queue or reason.
        """
        anonymous = getattr(request.state, "anonymous", False)
        if not worker.healthy:
            details = {} if anonymous else {"model": name, "reason": worker.failure or "worker stopped"}
            return JSONResponse({"status": "unusable"} | details, status_code=503)
        return {"status": "ok"} | ({} if anonymous else {"model": name, "waiting": worker.waiting})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specialize"}]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "specialize"}

    def check_chars(text: str, param: str) -> None:
        if max_chars is not None and len(text) > max_chars:
            raise APIError(400, f"the prompt has {len(text):,} characters, more than the model's context of "
                                f"{context} tokens can hold (at most {MAX_CHARS_PER_TOKEN} characters per token)",
                           param=param, code="context_length_exceeded")

    def chat_prompt(raw: bytes) -> tuple[ChatCompletionRequest, list[dict], list[int], dict, bool]:
        """Parse, check, render and tokenise a chat request: runs in a worker thread, never in the event loop.

        Returns the body, the messages, the prompt's ids, the Job options (grammar, logprobs, where to end)
        and whether the answer's tool calls are parsed.
        """
        body = parsed(ChatCompletionRequest, raw)
        check_model(body.model)
        # Cheap bounds first: rendering 100,000 tiny messages takes seconds, and each message costs
        # at least one token of the template's markup.
        if context is not None and len(body.messages) > context:
            raise APIError(400, f"the conversation has {len(body.messages):,} messages, more than the model's "
                                f"context of {context} tokens can hold", param="messages",
                           code="context_length_exceeded")
        check_chars("".join((m.content or "") + "".join(c.function.arguments for c in m.tool_calls or [])
                            for m in body.messages) + json.dumps(body.tools or []), "messages")
        plan = tooling.plan(body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        options = {"top_logprobs": top, "end_after": plan.end_after}
        needs_batch = [what for what, wanted in (("response_format", plan.grammar_param == "response_format"),
                                                 ("tool_choice", plan.grammar is not None or plan.end_after),
                                                 ("logprobs", top is not None)) if wanted]
        if needs_batch and not worker.batched:
            raise APIError(400, f"{needs_batch[0]} is not supported for this model: it answers one request at a "
                                f"time (its KV cache cannot be batched), and only the batched path enforces "
                                f"grammars and reports logprobs", param=needs_batch[0], code="unsupported")
        messages = [m.as_dict() for m in body.messages]
        try:
            text = tooling.render(generator, messages, plan.tools)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the run's chat template rejects these messages: {e}", param="messages") from None
        check_chars(text, "messages")
        if plan.grammar is not None:
            options["constraint"] = grammars.constraint(plan.grammar, plan.grammar_param)
        return body, messages, generator.text_ids(text), options, plan.parse_calls

    def text_prompt(raw: bytes) -> tuple[CompletionRequest, str, list[int]]:
        """Parse and tokenise a completion request (raw text, with the special tokens the tokenizer adds)."""
        body = parsed(CompletionRequest, raw)
        check_model(body.model)
        if body.logprobs is not None and not worker.batched:
            raise APIError(400, "logprobs is not supported for this model: it answers one request at a time",
                           param="logprobs", code="unsupported")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        check_chars(prompt, "prompt")
        return body, prompt, generator.tokenizer(prompt)["input_ids"]

    # The bodies are read by hand (BodyLimit has them in memory already) so that parsing, like
    # rendering and tokenising, happens off the event loop: 4 MB of tiny messages take a second.
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, messages, ids, options, parse_calls = await asyncio.to_thread(chat_prompt, await request.body())
        return await answer(request, body, "chat", ids, body.max_tokens or body.max_completion_tokens, messages,
                            options, parse_calls)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, prompt, ids = await asyncio.to_thread(text_prompt, await request.body())
        return await answer(request, body, "text", ids, body.max_tokens, prompt, {"top_logprobs": body.logprobs})

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
          f"(API key {'required' if keyed else 'not required'}"
          f"{', except for /health' if keyed and cfg.health_open else ''}); Ctrl-C stops",
          flush=True)
    server = uvicorn.Server(server_config(app, cfg, log_config=_log_config()))
    server.run(sockets=[sock])


def server_config(app: FastAPI, cfg: ServeConfig, **options):
    """uvicorn's settings for `app`: its HTTP protocol with our request deadlines, no websockets.

    `options` go to `uvicorn.Config` as they are (tests pass `log_config=None`).
    """
    import uvicorn
    from uvicorn.protocols.http.auto import (
        AutoHTTPProtocol,  # httptools when installed, else h11
    )

    protocol = deadline_protocol(AutoHTTPProtocol, cfg.header_timeout_s,
                                 cfg.read_timeout_s)
    return uvicorn.Config(app, http=protocol, ws="none", access_log=False, **options)
