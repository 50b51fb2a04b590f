"""The FastAPI application of one frontend process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from ipc.arena import pid_alive
from model_server import __version__, metrics
from model_server.settings import Settings, get_settings

from . import auth, errors, v1, v2
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
        grpc = await _start_grpc(settings, service, app)
        try:
            yield
        finally:
            if grpc is not None:
                await grpc.stop()
            await service.close()

    app = FastAPI(
        title="Model Server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
    )
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.state.activity = Activity()
    app.state.auth = auth.AuthPolicy(settings)  # reads the token files; a bad token fails here
    auth.install_openapi(app, app.state.auth)
    return app


async def _start_grpc(settings: Settings, service: Service, app: FastAPI) -> GrpcFrontend | None:
    """The gRPC listener beside uvicorn (frontend/grpc_server.py), unless MODEL_SERVER_GRPC_PORT=0."""
    if not settings.grpc_port:
        return None
    grpc = GrpcFrontend(settings, service, app.state.activity, app.state.auth)
    await grpc.start()
    return grpc


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
