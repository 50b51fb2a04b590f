"""What the ``/v1`` and ``/v2`` route modules share: JSON responses, readiness, and the
inference body's decompression and size bound."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from ipc.messages import TensorSpec

from .compression import decompress_request
from .coordinator_client import CoordinatorUnavailable
from .limits import check_json_size
from .service import Service


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def tensor_specs(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in specs]


RawHeaders = tuple[tuple[bytes, bytes], ...]


class RawResponse(Response):
    """A ``Response`` with its final bytes and headers, built without Starlette's header
    machinery (a few µs per small inference); ``frontend.fastpath`` sends its fields as
    raw ASGI messages, FastAPI routes return it as any ``Response``."""

    def __init__(self, body: bytes, media_type: bytes, status: int = 200, headers: RawHeaders = ()) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        # Starlette's order: given headers, then content-length and content-type.
        self.raw_headers = [*headers, (b"content-length", b"%d" % len(body)), (b"content-type", media_type)]


def json_response(body: Any, status: int = 200) -> Response:
    return RawResponse(orjson.dumps(body), b"application/json", status)


def inference_body(
    service: Service, headers: Mapping[str, str], body: bytes | memoryview, json_size: int | None = None
) -> bytes | memoryview:
    """An inference body inflated (``Content-Encoding``, capped at MAX_REQUEST_BYTES) and its JSON
    part (``json_size`` bytes, default all) bounded by MAX_JSON_REQUEST_BYTES: the same on both APIs."""
    settings = service.settings
    inflated = decompress_request(headers, body, settings.max_request_bytes)
    check_json_size(settings, len(inflated) if json_size is None else min(json_size, len(inflated)))
    return inflated


async def ready(request: Request) -> Response:
    """200 when the coordinator answers, a worker is alive and every start-up model is loaded and warm."""
    body, ok = await readiness(service_of(request))
    return json_response(body, 200 if ok else 503)


async def readiness(service: Service) -> tuple[dict[str, Any], bool]:
    """What ``/ready`` answers, and whether it is ready (the gRPC health service asks the same)."""
    if service.draining:
        return {"ready": False, "reasons": ["server is draining"], "models": 0, "workers": 0}, False
    try:
        reply = await service.coordinator.refresh(timeout=min(1.0, service.settings.coordinator_timeout_s))
    except CoordinatorUnavailable as exc:
        return {"ready": False, "reasons": [str(exc)], "models": 0, "workers": 0}, False
    table = reply.table
    assert table is not None
    return {
        "ready": table.ready,
        "reasons": table.reasons,
        "models": sum(1 for m in table.models if m.state == "ready"),
        "workers": sum(1 for w in table.workers if w.alive),
    }, table.ready
