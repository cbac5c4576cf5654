"""What one client may cost the server: a body-size cap, and deadlines for receiving a request.

`BodyLimit` (ASGI) reads each request body before the routes do, refusing with 413 as soon as it
is known to be too large: from its Content-Length before a byte of it is read, or, for chunked
uploads, the moment the bytes counted so far pass the cap. A refused connection is closed
rather than drained.

`deadline_protocol` wraps uvicorn's HTTP protocol, because uvicorn has no request timeout
(encode/uvicorn#157): its keep-alive timer only runs between requests and is reset by every
byte received, so a client that sends nothing, or one byte at a time, held its connection
forever. ASGI middleware cannot help: the app is only called once the headers are complete.
"""

from __future__ import annotations

import asyncio
import json
import logging

from specialize.serve.schema import APIError

logger = logging.getLogger("specialize.serve")


class BodyLimit:
    """ASGI middleware: request bodies above `max_bytes` get a 413 in OpenAI's error shape."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refuse(self, size: str):
        error = APIError(413, f"the request body ({size}) is larger than this server's limit of "
                              f"{self.max_bytes:,} bytes", code="request_too_large")
        response = error.response()
        response.headers["Connection"] = "close"  # don't read (and throw away) the rest of a huge upload
        return response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(f"{int(declared):,} bytes")(scope, receive, send)
        chunks, size = [], 0
        while True:  # chunked uploads have no Content-Length: count while receiving
            message = await receive()
            if message["type"] != "http.request":  # the client left (or timed out) before its body was in
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(f"over {self.max_bytes:,} bytes")(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():  # the whole body once, then the real channel (disconnect notices)
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)


# A minimal response written straight to the socket: no request was parsed that a framework
# could answer, and h11 refuses to send a response before it has seen one.
_TIMEOUT_BODY = json.dumps({"error": {"message": "the request was not received in time", "type":
                                      "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY) + _TIMEOUT_BODY)


def deadline_protocol(base: type, header_timeout_s: float, read_timeout_s: float) -> type:
    """`base` (a uvicorn HTTP protocol class) with deadlines for receiving each request.

    A request's line and headers must arrive within `header_timeout_s` of the connection opening
    (or of the next request's first byte on a kept-alive connection), and its body within
    `read_timeout_s` of the headers. Past either, the connection is closed, with a 408 where the
    client is still owed a response. Once a request is received, no deadline runs: slow answers
    and long streams are never cut.
    """

    class Deadlines(base):
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None
        _heard = False  # bytes of the awaited request head have arrived (a silent connection gets no 408)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._follow()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()
            self._heard = self._phase == "head"

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _phase_now(self) -> str | None:
            """'head' while a request line and headers are awaited, 'body' while a body is; else None."""
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.response_complete:  # the next request (or the first) is due
                return "head"
            return "body" if cycle.more_body else None

        def _follow(self) -> None:
            """(Re)start the deadline when the connection enters a new phase; stop it once a request is in.

            A kept-alive connection that has sent nothing since its last response is left to
            uvicorn's own keep-alive timeout, which closes it when idle.
            """
            phase = self._phase_now()
            if phase == self._phase:
                return
            self._disarm()
            self._phase, self._heard = phase, False
            if phase is not None:
                seconds = header_timeout_s if phase == "head" else read_timeout_s
                self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, phase, seconds)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self, phase: str, seconds: float) -> None:
            self._timer = None
            if self._phase_now() != phase or self.transport.is_closing():
                return
            cycle = getattr(self, "cycle", None)
            owed = self._heard if phase == "head" else not cycle.response_started  # a request awaits an answer
            logger.info("closed a connection from %s: request %s not received within %gs",
                        _peer(self), "headers" if phase == "head" else "body", seconds)
            if owed:
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    Deadlines.__name__ = Deadlines.__qualname__ = f"Deadline{base.__name__}"
    return Deadlines


def _peer(protocol) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"
