"""Pure-ASGI middleware on the request path: request id, body size limit, access log.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which breaks context
variables and costs a task per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_server.logs import request_id_var

from .errors import ApiError, render, send_response
from .limits import too_large

log = logging.getLogger("model_server.access")

VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Scope key the server's protocol (frontend.edge) sets once a request's whole body is in its
# buffer: reading it then cannot wait, so it needs no deadline timer.
BODY_RECEIVED = "model_server.body_received"
HEALTH_PATHS = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"})
PROBE_PATHS = HEALTH_PATHS | {"/metrics"}


class BodyError(ApiError, HTTPException):
    """A body that cannot be read to its end: answered in the one error shape, never a 500.

    An ``ApiError`` for the fast path and the app's handlers, and a Starlette
    ``HTTPException`` so that FastAPI, which turns any other error while reading a
    body into 400 "error parsing the body", lets it through to those handlers.
    """

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        HTTPException.__init__(self, status, message)  # not ApiError's: it would pass only the message on
        Exception.__init__(self, message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after = None


class BodyTooLarge(BodyError):
    """A body (chunked, or longer than announced) grew past the limit while being read."""

    def __init__(self, seen: int, limit: int) -> None:
        error = too_large(
            f"request body of more than {limit} bytes ({seen} read)", "MAX_REQUEST_BYTES", limit
        )
        super().__init__(error.status, error.code, error.message, error.details)


class BodyTimeout(BodyError):
    """The body did not arrive within MODEL_SERVER_BODY_TIMEOUT_S of the headers.

    Raised from ``receive``: whoever was reading answers 408 (and frees what it reserved),
    and the middleware closes the connection, since the rest of the body will not be read.
    """

    def __init__(self, seen: int, timeout_s: float) -> None:
        super().__init__(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s ({seen} bytes read; "
            "MODEL_SERVER_BODY_TIMEOUT_S)",
            {"timeout_s": timeout_s},
        )


@dataclass(slots=True, eq=False)
class Activity:
    """HTTP requests in progress in this process (read by the drain on SIGTERM)."""

    active: int = 0
    # Set at the start of a drain: every response then closes its connection, so a client
    # never sends its next request on a keep-alive connection the server is about to drop.
    draining: bool = False


@dataclass(slots=True, eq=False)
class _Exchange:
    """One HTTP request's state in the middleware: its ``send`` and ``receive`` wrappers.

    Bound methods of one small object rather than closures over lists: fewer allocations per
    request, and the body deadline is one timer handle armed only while a body is awaited.
    """

    middleware: RequestContextMiddleware
    scope: Scope
    _receive: Receive
    _send: Send
    header: tuple[bytes, bytes]
    deadline: float = 0.0
    status: int = 0
    seen: int = 0
    body_done: bool = False
    timed_out: bool = False  # the rest of the body will never be read: the connection goes
    timer: asyncio.TimerHandle | None = None
    waiter: asyncio.Task[Any] | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [*message.get("headers", ()), self.header]
            if self.middleware.activity.draining or self.timed_out:
                headers.append((b"connection", b"close"))
            message["headers"] = headers
        await self._send(message)

    async def receive(self) -> Message:
        if self.timed_out:
            self._expire_now()  # the rest of the body will never be read: every read fails
        if self.body_done or BODY_RECEIVED in self.scope:
            message = await self._receive()
        else:
            message = await self._receive_by_deadline()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            limit = self.middleware.max_body_bytes
            if self.seen > limit:
                raise BodyTooLarge(self.seen, limit)
        if not message.get("more_body", False):  # the last chunk, or a disconnect: nothing more will come
            self.body_done = True
            self.cancel_timer()
        return message

    async def _receive_by_deadline(self) -> Message:
        # uvicorn has no body-read timeout: a client that announces a body and sends it slowly
        # would hold whatever the handler reserved for it. One timer for the whole body, armed
        # at the first read (a body read in one piece arms and cancels it once).
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_at(self.deadline, self._on_deadline)
        self.waiter = asyncio.current_task()
        try:
            return await self._receive()
        except asyncio.CancelledError:
            task = self.waiter
            if not self.timed_out or task is None or task.uncancel() > 0:
                raise  # cancelled for another reason (client gone, shutdown): not ours to swallow
            self._expire_now()
        finally:
            self.waiter = None

    def _on_deadline(self) -> None:
        self.timer = None
        if self.body_done:
            return
        self.timed_out = True
        # Waiting for the body now: interrupt the wait. Otherwise the next read fails at once.
        if self.waiter is not None:
            self.waiter.cancel()

    def _expire_now(self) -> NoReturn:
        self.cancel_timer()
        raise BodyTimeout(self.seen, self.middleware.body_timeout_s)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        access_log: bool = True,
        activity: Activity | None = None,
    ) -> None:
        self.app = app
        self.activity = activity or Activity()
        # Generated ids: a random per-process prefix and a counter (unique without a syscall each).
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.body_timeout_s = body_timeout_s

    def _read_headers(self, scope: Scope) -> tuple[str, int]:
        """(request id, announced body length or -1) from the raw headers, in one pass."""
        request_id = ""
        length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if VALID_REQUEST_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
        if not request_id:
            request_id = f"{self._id_prefix}{next(self._ids):x}"
        return request_id, length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, length = self._read_headers(scope)
        token = request_id_var.set(request_id)
        self.activity.active += 1
        exchange = _Exchange(self, scope, receive, send, (b"x-request-id", request_id.encode()))
        try:
            await self._serve(scope, exchange, length)
        finally:
            self.activity.active -= 1
            exchange.cancel_timer()  # the handler may have left before reading the whole body
            if self.access_log:
                self._log(scope, exchange.status, started)
            request_id_var.reset(token)

    async def _serve(self, scope: Scope, exchange: _Exchange, length: int) -> None:
        if length > self.max_body_bytes:
            await self._too_large(scope, exchange.send, length)
            return
        exchange.deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BodyTooLarge:
            if exchange.status == 0:
                await self._too_large(scope, exchange.send, exchange.seen)

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
        if log.isEnabledFor(level):
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.log(level, "%s %s %d %.2fms", scope["method"], path, status or 500, elapsed_ms)

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        error = too_large(f"request body of {size} bytes", "MAX_REQUEST_BYTES", self.max_body_bytes)
        await send_response(send, render(scope["path"], error))
