"""A pure-ASGI fast path for the inference endpoints.

Measured on the 2-core machine, FastAPI's routing, dependency and exception
layers cost more per small request than the whole shared-memory round trip to
a worker (see BENCHMARKS.md). Inference requests therefore go straight from
the request-context middleware to the same handlers the FastAPI routes call
(``v1.infer_v1``, ``v2.infer_v2``); everything else, including the documented
routes for ``/docs``, goes through FastAPI. Errors are answered with the same
``errors.render`` as the FastAPI handlers.

No slow client can hold the arena: a binary body is streamed into an arena slot
only after its model was found ready, and only while the bodies still arriving
in this process hold less than ``MODEL_SERVER_MAX_PENDING_BODY_BYTES`` (at most
a quarter of the arena); any other body is read into process memory as it
arrives (so it holds only what it sent) and copied into the arena when the
request is dispatched. The middleware's body timeout ends a body that stalls.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ipc.arena import ALIGNMENT, Arena
from model_server.settings import Settings

from .compression import compress_response
from .dispatcher import BodyLease
from .errors import ApiError, render, send_response
from .limits import check_json_size
from .service import Service
from .v1 import infer_v1
from .v2 import infer_v2
from .v2_codec import HEADER_LENGTH

_V2 = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferenceFastPath:
    def __init__(self, app: ASGIApp, state: object) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: its lifespan puts the Service there
        # Arena bytes held by binary bodies still arriving in this process (MAX_PENDING_BODY_BYTES).
        self.pending_body_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        match = None if path == "/v1/infer" else _V2.match(path)
        if match is None and path != "/v1/infer":
            await self.app(scope, receive, send)
            return
        service: Service = self.state.service  # type: ignore[attr-defined]
        # One scan of the raw headers; reversed so that a repeated header reads as its first
        # occurrence, as Starlette's ``Headers.get`` does.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        try:
            if match is None:
                body = await _read_body(receive, _json_limit(service, headers))
                response = await infer_v1(service, headers, body)
            else:
                version = match["version"]
                model, version = unquote(match["model"]), unquote(version) if version else None
                response = await self._v2(service, headers, receive, model, version)
            if service.settings.response_compression:
                response = compress_response(response, headers.get("accept-encoding"))
        except Exception as exc:
            response = render(path, exc)
        await send_response(send, response)  # the middleware's send adds X-Request-ID

    async def _v2(
        self, service: Service, headers: dict[str, str], receive: Receive, model: str, version: str | None
    ) -> Response:
        json_limit = None if HEADER_LENGTH in headers else _json_limit(service, headers)
        sizes = _binary_sizes(service, headers)
        lease: BodyLease | None = None
        try:
            if sizes is not None:
                # Before anything is reserved or read: 404/409/503 for a model not ready.
                await service.entry(model, version)
                lease = self._lease_for(service, *sizes)
            if lease is None:
                body: bytes | memoryview = await _read_body(receive, json_limit)
            else:
                self.pending_body_bytes += lease.slot.size
                try:
                    body = await _stream_into(service.dispatcher.arena, lease, receive)
                finally:
                    self.pending_body_bytes -= lease.slot.size
            return await infer_v2(service, model, version, headers, body, lease)
        finally:
            if lease is not None and lease.owned:
                service.dispatcher.arena.free(lease.slot)  # never handed to a worker

    def _lease_for(self, service: Service, size: int, header_size: int) -> BodyLease | None:
        """A slot for a binary-extension body, or None to read it into process memory.

        The body is written at an offset that puts the first binary tensor (right after the
        JSON header) on a 64-byte boundary, so the worker can view it in place. None when the
        bodies still arriving would hold more than their budget, or the arena is busy: such a
        body then holds only the bytes it has sent, and the arena is asked once it is complete.
        """
        settings = service.settings
        pad = -header_size % ALIGNMENT
        budget = min(settings.max_pending_body_bytes, settings.shm_arena_bytes // 4)
        if self.pending_body_bytes + pad + size > budget:
            return None
        try:
            slot = service.dispatcher.reserve(pad + size)
        except ApiError:
            return None
        return BodyLease(slot, slot.offset + pad, size)


def _binary_sizes(service: Service, headers: dict[str, str]) -> tuple[int, int] | None:
    """(body size, JSON header size) of a binary-extension body that could stream into the arena:
    its size known and within the limit, and not compressed."""
    length, header = headers.get("content-length"), headers.get(HEADER_LENGTH)
    if length is None or header is None or headers.get("content-encoding", "identity") != "identity":
        return None
    try:
        size, header_size = int(length), int(header)
    except ValueError:
        return None  # the handler explains what is wrong
    if not 0 <= header_size <= size <= service.settings.max_request_bytes:
        return None
    return size, header_size


def _json_limit(service: Service, headers: dict[str, str]) -> Settings | None:
    """The settings that bound a JSON body while it is read if it is not compressed, after a 413
    for one announced over MODEL_SERVER_MAX_JSON_REQUEST_BYTES, before it is read.

    None for a compressed body: the handler checks it once inflated.
    """
    if headers.get("content-encoding", "identity").lower() != "identity":
        return None
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        check_json_size(service.settings, int(length))
    return service.settings


async def _stream_into(arena: Arena, lease: BodyLease, receive: Receive) -> memoryview:
    """Receive the body straight into the lease's slot: the only copy of the tensors on the way in."""
    pos = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise ApiError(400, "bad_request", "the client went away while sending the body")
        chunk = message.get("body", b"")
        if pos + len(chunk) > lease.size:
            raise ApiError(400, "bad_request", "the body is longer than its Content-Length")
        arena.view(lease.base + pos, len(chunk))[:] = chunk
        pos += len(chunk)
        more = message.get("more_body", False)
    if pos != lease.size:
        raise ApiError(400, "bad_request", f"the body has {pos} bytes, its Content-Length says {lease.size}")
    return arena.view(lease.base, lease.size)


async def _read_body(receive: Receive, json_limit: Settings | None = None) -> bytes:
    """The whole body; with ``json_limit``, 413 as soon as it is longer than a JSON body may be
    (a chunked body announces no length to refuse it by)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the common case: one chunk, no copy
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if json_limit is not None:
            check_json_size(json_limit, size)
        chunks.append(chunk)
    return b"".join(chunks)
