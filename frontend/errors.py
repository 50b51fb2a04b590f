"""The one error type of the frontend (``ApiError``), and
its rendering per protocol: ``/v2`` as Triton, MLServer and KServe answer, the other paths
in the seed's shape, gRPC through ``describe`` (``frontend.grpc_server`` maps the status).
It imports no other frontend module but the coordinator client's, so every one can import it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Send

from model_server.logs import request_id_var

from .coordinator_client import CoordinatorUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after


def describe(exc: BaseException) -> ApiError | None:
    """The ``ApiError`` an exception the server raises on purpose stands for; None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CoordinatorUnavailable):
        return ApiError(503, "coordinator_unavailable", str(exc), retry_after=1)
    return None


def error_response(
    request_path: str,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> Response:
    body: dict[str, Any]
    if request_path.startswith("/v2"):
        body = {"error": message}
        status = 400 if status == 422 else status  # the protocol's implementations answer bad input 400
    else:
        body = {
            "error": {
                "code": code,
                "message": message,
                "request_id": request_id_var.get(),
                "details": details or {},
            }
        }
    headers: dict[str, str] = {}  # X-Request-ID is added by the middleware on every response
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def render(path: str, exc: BaseException) -> Response:
    """The response for any exception on ``path``: its own error, or a logged 500."""
    error = describe(exc)
    if error is None:
        log.error("unhandled error on %s", path, exc_info=exc)
        error = ApiError(500, "internal_error", f"internal error: {type(exc).__name__}")
    return error_response(path, error.status, error.code, error.message, error.details, error.retry_after)


async def send_response(send: Send, response: Response) -> None:
    """A complete response as raw ASGI messages: ``Response.__call__`` without its per-call work."""
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})
