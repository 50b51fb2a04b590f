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
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_server.logs import request_id_var

from .errors import ApiError

log = logging.getLogger("model_server.access")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PROBE_PATHS = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready", "/metrics"})


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
        super().__init__(
            413,
            "payload_too_large",
            f"request body of more than {limit} bytes ({seen} read) exceeds "
            f"MODEL_SERVER_MAX_REQUEST_BYTES={limit}",
            {"limit": limit},
        )


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


class Activity:
    """HTTP requests in progress in this process (read by the drain on SIGTERM)."""

    def __init__(self) -> None:
        self.active = 0
        # Set at the start of a drain: every response then closes its connection, so a client
        # never sends its next request on a keep-alive connection the server is about to drop.
        self.draining = False


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        access_log: bool = True,
        activity: Activity | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.activity = activity or Activity()
        # Generated ids: a random per-process prefix and a counter (unique without a syscall each).
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = ""
        length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
        if not request_id:
            request_id = f"{self._id_prefix}{next(self._ids):x}"
        token = request_id_var.set(request_id)
        self.activity.active += 1
        header = (b"x-request-id", request_id.encode())
        status = [0]
        # Set when the body timed out: the rest of it will never be read, so the connection goes.
        timed_out = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                close = self.activity.draining or timed_out[0]
                extra = [header, (b"connection", b"close")] if close else [header]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            if length > self.max_body_bytes:
                await self._too_large(scope, send_with_id, length)
                return
            seen = [0]
            body_done = [False]
            timeout_s = self.body_timeout_s
            deadline = started + timeout_s if timeout_s is not None else 0.0

            async def limited_receive() -> Message:
                if body_done[0] or timeout_s is None:
                    message = await receive()
                else:
                    # uvicorn has no body-read timeout: a client that announces a body and sends
                    # it slowly would hold whatever the handler reserved for it.
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                            message = await receive()
                    except TimeoutError:
                        timed_out[0] = True
                        raise BodyTimeout(seen[0], timeout_s) from None
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body_bytes:
                        raise BodyTooLarge(seen[0], self.max_body_bytes)
                    if not message.get("more_body", False):
                        body_done[0] = True
                else:
                    body_done[0] = True  # disconnected: nothing more will come
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except BodyTooLarge:
                if status[0] == 0:
                    await self._too_large(scope, send_with_id, seen[0])
        finally:
            self.activity.active -= 1
            if self.access_log:
                elapsed_ms = (time.perf_counter() - started) * 1000
                path = scope["path"]
                level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, "%s %s %d %.2fms", scope["method"], path, status[0] or 500, elapsed_ms)
            request_id_var.reset(token)

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        message = f"request body of {size} bytes exceeds MODEL_SERVER_MAX_REQUEST_BYTES={self.max_body_bytes}"
        body: Any
        if scope["path"].startswith("/v2"):
            body = {"error": message}
        else:
            body = {
                "error": {
                    "code": "payload_too_large",
                    "message": message,
                    "request_id": request_id_var.get(),
                    "details": {"limit": self.max_body_bytes},
                }
            }
        payload = orjson.dumps(body)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
