"""Who may talk to the studio: the token on every request, and no state change from another site.

- Every page, file and API call needs the token: `?token=T` once (the URL the studio prints,
  as Jupyter's), which sets a cookie and redirects to the same page without it, or the cookie,
  or `Authorization: Bearer T` (scripts). Missing or wrong: 401, nothing else is said.
- The cookie is `HttpOnly; SameSite=Strict`: a request that another site makes the browser send
  carries no cookie, so it fails the token check.
- A state-changing request (anything but GET/HEAD) that authenticates with the cookie must also
  carry the header `X-Studio: 1` (a cross-site page cannot add it without a CORS preflight,
  which the studio never grants) and, where the browser says where it came from (`Origin`,
  `Sec-Fetch-Site`), come from the studio's own origin: else 403.
- Bodies are capped: an upload at `max_upload_bytes` (413 as soon as its Content-Length says
  so, or once that many bytes have arrived), any other request at `MAX_JSON_BYTES`.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qsl, urlencode

SAFE_METHODS = {"GET", "HEAD"}
CSRF_HEADER = b"x-studio"
MAX_JSON_BYTES = 1 << 20
UPLOAD_PATH = "/api/files"
# The page loads only its own script and style; nothing frames it; responses are not cached.
PAGE_CSP = b"default-src 'self'; img-src 'self' data:; frame-src 'self'; frame-ancestors 'none'; form-action 'self'"
SECURITY_HEADERS = [(b"content-security-policy", PAGE_CSP), (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer")]


def _respond(status: int, message: str, *, json_body: bool, headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps({"error": message}).encode() if json_body else \
        f"<!doctype html><title>{status}</title><p>{message}</p>".encode()
    kind = b"application/json" if json_body else b"text/html; charset=utf-8"

    async def send_to(send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"x-content-type-options", b"nosniff"), *headers]})
        await send({"type": "http.response.body", "body": body})
    return send_to


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of every route (see the module docstring)."""

    def __init__(self, app, token: str, cookie: str, max_upload_bytes: int):
        self.app, self.token, self.cookie = app, token.encode(), cookie
        self.max_upload_bytes = max_upload_bytes

    def _valid(self, given: bytes | str | None) -> bool:
        if not given:
            return False
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self.token)

    def _cookie_token(self, headers: dict[bytes, bytes]) -> str | None:
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie:
                return value
        return None

    @staticmethod
    def _same_origin(scope, headers: dict[bytes, bytes]) -> bool:
        site = headers.get(b"sec-fetch-site")
        if site is not None and site not in (b"same-origin", b"none"):
            return False
        origin = headers.get(b"origin")
        if origin is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            return origin.decode("latin-1") in (f"http://{host}", f"https://{host}")
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path, method = scope["path"], scope["method"]
        is_api = path.startswith("/api/")
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = dict(query).get("token")
        if given is not None and not is_api:
            if not self._valid(given):
                return await _respond(401, "wrong token: open the URL the studio printed", json_body=False)(send)
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            cookie = f"{self.cookie}={given}; HttpOnly; SameSite=Strict; Path=/"
            return await _respond(303, "signed in", json_body=False, headers=[
                (b"location", (path + (f"?{rest}" if rest else "")).encode()),
                (b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")])(send)
        scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
        by_header = scheme.lower() == b"bearer" and self._valid(bearer.strip())
        by_cookie = not by_header and self._valid(self._cookie_token(headers))
        if not (by_header or by_cookie):
            return await _respond(401, "missing or wrong token: open the URL with ?token= that `specialize studio` "
                                  "printed", json_body=is_api)(send)
        if method not in SAFE_METHODS:
            if by_cookie and headers.get(CSRF_HEADER) != b"1":
                return await _respond(403, "cross-site request refused (missing X-Studio header)", json_body=True)(send)
            if not self._same_origin(scope, headers):
                return await _respond(403, "cross-site request refused (Origin)", json_body=True)(send)
        limit = self.max_upload_bytes if path == UPLOAD_PATH and method == "PUT" else MAX_JSON_BYTES
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _respond(413, f"request body larger than {limit:,} bytes", json_body=True)(send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = message | {"headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, self._capped(receive, limit), send_with_headers)
        except BodyTooLarge:
            if started:
                raise
            await _respond(413, f"request body larger than {limit:,} bytes", json_body=True)(send)

    @staticmethod
    def _capped(receive, limit: int):
        """`receive` that raises BodyTooLarge past `limit` bytes (a body sent without Content-Length)."""
        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message
        return capped
