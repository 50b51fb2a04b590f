"""A pure-ASGI fast path for the inference endpoints.

Measured on the 2-core machine, FastAPI's routing, dependency and exception
layers cost more per small request than the whole shared-memory round trip to
a worker (see BENCHMARKS.md). Inference requests therefore go straight from
the request-context middleware to the same handlers the FastAPI routes call
(``v1.infer_v1``, ``v2.infer_v2``); everything else, including the documented
routes for ``/docs``, goes through FastAPI. Errors are answered with the same
``errors.exception_response`` as the FastAPI handlers.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import exception_response, internal_error
from .service import Service
from .v1 import infer_v1
from .v2 import infer_v2

_V2 = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferenceFastPath:
    def __init__(self, app: ASGIApp, state: object) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: its lifespan puts the Service there

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/v1/infer":
            model = version = None
            protocol = "v1"
        else:
            match = _V2.match(path)
            if match is None:
                await self.app(scope, receive, send)
                return
            model, version = unquote(match["model"]), match["version"]
            protocol = "v2"
        service: Service = self.state.service  # type: ignore[attr-defined]
        body = await _read_body(receive)
        try:
            if protocol == "v1":
                response = await infer_v1(service, body)
            else:
                assert model is not None
                response = await infer_v2(
                    service, model, unquote(version) if version else None, Headers(scope=scope), body
                )
        except Exception as exc:
            response = exception_response(path, exc) or internal_error(path, exc)
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the common case: one chunk, no copy
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)
