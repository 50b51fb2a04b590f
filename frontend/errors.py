"""One error shape for the whole HTTP surface.

``/v1`` and the seed's paths answer ``{"error": {"code", "message", "request_id", "details"}}``;
``/v2`` answers ``{"error": "<message>"}`` as the Open Inference Protocol's
implementations (Triton, MLServer, KServe) do, so their clients parse it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path

from model_server.logs import request_id_var

from .coordinator_client import CoordinatorUnavailable
from .dispatcher import DispatchError

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


def error_response(
    request_path: str,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> Response:
    request_id = request_id_var.get()
    if request_path.startswith("/v2"):
        body: dict[str, Any] = {"error": message}
        # The protocol's implementations answer bad input with 400 (the /v1 API uses 422).
        status = 400 if status == 422 else status
    else:
        body = {
            "error": {"code": code, "message": message, "request_id": request_id, "details": details or {}}
        }
    headers: dict[str, str] = {}  # X-Request-ID is added by the middleware on every response
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def exception_response(path: str, exc: Exception) -> Response | None:
    """The error response for an exception the API raises on purpose; None for anything else."""
    if isinstance(exc, ApiError):
        return error_response(path, exc.status, exc.code, exc.message, exc.details, exc.retry_after)
    if isinstance(exc, DispatchError):
        return error_response(path, exc.status, exc.code, exc.message, retry_after=exc.retry_after)
    if isinstance(exc, CoordinatorUnavailable):
        return error_response(path, 503, "coordinator_unavailable", str(exc), retry_after=1)
    return None


def internal_error(path: str, exc: Exception) -> Response:
    log.error("unhandled error on %s", path, exc_info=exc)
    return error_response(path, 500, "internal_error", f"internal error: {type(exc).__name__}")


def allowed_methods(app: FastAPI, path: str, raised: str | None) -> list[str]:
    """Every method some route serves at ``path`` (RFC 9110: what a 405's ``Allow`` lists).

    Starlette names only the methods of the first route whose path matched, so a path
    served by several routes (GET and DELETE ``/v1/models/{id}/{version}``) would list
    one. The documented operations are the routes' own table (the inference paths the
    fast path serves are documented too); ``raised`` adds an undocumented route's.
    """
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [
            (compile_path(template)[0], {method.upper() for method in operations})
            for template, operations in app.openapi().get("paths", {}).items()
        ]
        app.state.allow_table = table
    methods = {m.strip() for m in (raised or "").split(",") if m.strip()}
    for pattern, served in table:
        if pattern.match(path):
            methods |= served
    return sorted(methods)


def install(app: FastAPI) -> None:
    async def _known(request: Request, exc: Exception) -> Response:
        response = exception_response(request.url.path, exc)
        return response if response is not None else internal_error(request.url.path, exc)

    for kind in (ApiError, DispatchError, CoordinatorUnavailable):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return error_response(request.url.path, 422, "invalid_request", message, {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        response = error_response(request.url.path, exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            raised = (exc.headers or {}).get("Allow")
            response.headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path, raised))
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        return internal_error(request.url.path, exc)
