"""The FastAPI application of one frontend process."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp

from ipc.arena import pid_alive
from model_server import __version__, metrics
from model_server.settings import Settings, get_settings

from . import auth, v1, v2
from .coordinator_client import CoordinatorUnavailable
from .errors import ApiError, error_response, render
from .fastpath import InferenceFastPath
from .grpc_server import GrpcFrontend
from .middleware import Activity, RequestContextMiddleware
from .service import Service

log = logging.getLogger(__name__)

DESCRIPTION = """
ONNX inference server. HTTP frontends write tensors into shared memory and
dispatch them over ZeroMQ to worker processes pinned to GPUs or CPU cores; a
coordinator owns the model table. Errors share one shape:
`{"error": {"code", "message", "request_id", "details"}}` (`/v2`: `{"error": "..."}`).
"""

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.service = service
        directory = metrics.multiprocess_dir()
        if directory is not None:
            metrics.sweep_dead(directory, pid_alive)
        await service.start()
        log.info(
            "frontend ready (arena %s, %d bytes)", service.dispatcher.arena.name, settings.shm_arena_bytes
        )
        grpc: GrpcFrontend | None = None
        if settings.grpc_port:  # 0: no gRPC listener beside uvicorn (frontend/grpc_server.py)
            grpc = GrpcFrontend(settings, service, app.state.activity, app.state.auth)
            await grpc.start()
        try:
            yield
        finally:
            if grpc is not None:
                await grpc.stop()
            await service.close()

    app = FastAPI(title="Model Server", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.state.activity = Activity()
    app.state.auth = auth.AuthPolicy(settings)  # reads the token files; a bad token fails here
    auth.install_openapi(app, app.state.auth)
    return app


def asgi_app(app: FastAPI, settings: Settings) -> ASGIApp:
    """What uvicorn serves: request context, CORS, access control, the inference fast path, then FastAPI.

    Access control sits inside CORS so that a browser's preflight (which carries no token)
    is answered, and a 401 still carries the CORS headers the browser needs to read it.
    """
    inner: ASGIApp = auth.AuthMiddleware(InferenceFastPath(app, app.state), app.state.auth)
    if settings.cors_origins:
        inner = CORSMiddleware(
            inner,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Inference-Header-Content-Length", "Retry-After"],
        )
    return RequestContextMiddleware(
        inner,
        max_body_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        activity=app.state.activity,
        body_timeout_s=settings.body_timeout_s,
    )


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own errors (validation, 404, 405) in the one error shape (``frontend/errors.py``)."""

    async def _known(request: Request, exc: Exception) -> Response:
        return render(request.url.path, exc)

    for kind in (ApiError, CoordinatorUnavailable, Exception):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return error_response(request.url.path, 422, "invalid_request", message, {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = error_response(request.url.path, exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            raised = (exc.headers or {}).get("Allow")
            response.headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path, raised))
        return response


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
