"""The HTTP plumbing around the routes: API key check and request log (`Gate`), and noticing clients that left.

A waiting request polls its connection (`unless_gone`), so a client that goes away has its job
dropped from the queue or stopped; a stream runs its clean-up however it ends (`CancellingStream`).
Tracebacks stay in the server log; clients only ever see OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from specialize.serve.schema import APIError

logger = logging.getLogger("specialize.serve")
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there
CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in our log


class ClientGone(Exception):
    pass


async def unless_gone(request: Request, waiting: asyncio.Future):
    """`waiting`'s result, or `ClientGone` (and `waiting` cancelled) once the client has disconnected."""
    try:
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                raise ClientGone
    except BaseException:  # gone, or this handler was cancelled: nobody will read the result
        waiting.cancel()
        raise
    return waiting.result()


class CancellingStream(StreamingResponse):
    """A stream that runs `on_close` however it ends: finished, failed, or its client gone, even
    before its body generator first ran (a generator that never started runs no `finally`)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Gate:
    """ASGI middleware: API key check, one log line per request, and no traceback to clients.

    The log line has method, path, status, token counts and latency; message contents only
    with `log_contents`, and never the key.
    """

    def __init__(self, app, key: str | None, health_open: bool = False):
        self.app, self.key, self.health_open = app, key.encode() if key else None, health_open

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
                if self.health_open and scope["path"] == "/health" and scope["method"] in ("GET", "HEAD"):
                    state["anonymous"] = True  # answered, but with the status alone
                    return await self.app(scope, receive, send_and_note)
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
            status = status or CLIENT_GONE  # nothing sent: the client left before its request was in
            usage = state.get("usage")
            tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" if usage else ""
            logger.info("%s %s %d%s %.3fs", scope["method"], scope["path"], status, tokens,
                        time.perf_counter() - start)
