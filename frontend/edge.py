"""The connection edge of a frontend: uvicorn's httptools protocol with the bounds it lacks.

uvicorn has ``limit_concurrency`` and ``timeout_keep_alive`` but no header timeout
and no bound on header size with httptools, so a client could hold a
connection (and a slot of ``limit_concurrency``) forever by sending half a
request line, or grow the header list without end. This subclass adds, per
connection, at the cost of one timer handle per request:

* a header timeout (``MODEL_SERVER_HEADER_TIMEOUT_S``): armed when a connection
  opens or a request begins, cancelled when the headers are complete; when it
  fires the connection is closed (there is no request to answer yet). Idle
  keep-alive connections stay uvicorn's ``timeout_keep_alive``.
* a header size bound (``MODEL_SERVER_MAX_HEADER_BYTES``): 431 and closed.
* ``limit_concurrency`` answered in the project's error shape (503, Retry-After,
  Connection: close) instead of uvicorn's plain text and its warning log line per
  refused request; health probes and ``/metrics`` are exempt, so an orchestrator
  does not restart a frontend that is merely busy.

The body timeout is not here: it is enforced where the body is read
(``frontend.middleware``), so the handler that reserved memory frees it.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from model_server.settings import Settings

from .errors import error_response
from .middleware import BODY_RECEIVED, PROBE_PATHS


class EdgeHttpProtocol(HttpToolsProtocol):
    """httptools with the bounds above; ``protocol_class`` binds the class attributes to settings."""

    header_timeout_s = 10.0
    max_header_bytes = 16 * 1024
    limit = 1000

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _in_headers = False  # a request has begun and its headers are not complete yet
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # headers refused: read and dropped until the connection closes
        super().data_received(data)
        # Still inside a request's headers after this chunk: count it towards their bound, and
        # time them. A request whose headers came whole in this chunk never arms a timer.
        if self._in_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers()
            else:
                self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        limit = self.limit
        busy = len(self.connections) >= limit or len(self.tasks) >= limit
        if not busy or self.url.split(b"?", 1)[0].decode("latin-1") in PROBE_PATHS:
            super().on_headers_complete()
            return
        # uvicorn picks the app for the request in this callback: swap it for the refusal.
        app = self.app
        self.app = self._overloaded
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The whole body is buffered: the middleware's body deadline has nothing to wait for.
        self.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            scope["path"],
            503,
            "overloaded",
            f"this frontend has reached MODEL_SERVER_LIMIT_CONCURRENCY={self.limit} connections or requests",
            retry_after=1,
        )
        response.headers["connection"] = "close"  # shed the connection too, not just the request
        await response(scope, receive, send)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse_headers(self) -> None:
        self._disarm()
        self._refused = True
        message = f"request headers exceed MODEL_SERVER_MAX_HEADER_BYTES={self.max_header_bytes}"
        # Written on the transport: no ASGI request exists yet to answer through (nor a request id).
        error: object = message
        if not getattr(self, "url", b"").startswith(b"/v2"):
            error = {"code": "headers_too_large", "message": message, "request_id": "", "details": {}}
        payload = orjson.dumps({"error": error})
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(payload)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + payload
        )
        # A lingering close: closing with unread bytes would reset the connection and could
        # destroy the answer before the client reads it. Half-close, drop what still comes,
        # and close when the client does or one more header timeout has passed.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm()


def protocol_class(settings: Settings) -> type[HttpToolsProtocol]:
    """The httptools protocol class uvicorn's ``Config(http=...)`` takes, bound to ``settings``."""
    attributes = {
        "header_timeout_s": settings.header_timeout_s,
        "max_header_bytes": settings.max_header_bytes,
        "limit": settings.limit_concurrency,
    }
    return type("BoundEdgeHttpProtocol", (EdgeHttpProtocol,), attributes)
