"""Every status each kind of route can answer, for the OpenAPI document (``responses=``).

One dict per kind of route, so a status added to a code path is documented once
for every route of that kind. ``/v1`` and the seed's routes answer
``ErrorResponse``; ``/v2`` answers ``V2ErrorResponse`` (``{"error": "..."}``), and
its 422s are answered as 400 (``errors.error_response``). 405 (with ``Allow``) is
answered by every path for a method it does not serve and is left to the
protocol, as OpenAPI documents operations, not the methods a path lacks.
"""

from __future__ import annotations

from typing import Any

from .schemas import ErrorResponse, ReadyResponse, V2ErrorResponse
from .v2_schemas import ModelReady

Responses = dict[int | str, dict[str, Any]]

# Why each status happens, worded once for both error shapes.
_WHY: dict[int, str] = {
    400: "Malformed request: bad JSON, header, encoding, tensor or shared-memory region.",
    403: "Access to the model artifact denied.",
    404: "Unknown model or version (or, for a load, no artifact at the source).",
    409: "Model not usable: being unloaded, or its load failed.",
    413: "Body (or decompressed body) over MODEL_SERVER_MAX_REQUEST_BYTES, or too large for the arena.",
    422: "The request does not fit the API or the model's schema (the field is named).",
    501: "Unsupported feature or datatype (e.g. system shared memory disabled).",
    502: "The model source answered with an error.",
    503: "Coordinator unavailable, draining, model loading, no worker, queue or arena full (Retry-After).",
    504: "Deadline passed (inference, or the model source did not answer in time).",
    507: "The model does not fit the memory a worker may use.",
}


def _errors(shape: type, *statuses: int) -> Responses:
    return {status: {"model": shape, "description": _WHY[status]} for status in statuses}


# --- /health, /ready, /metrics and /v1 ---------------------------------------------------------
READY: Responses = {503: {"model": ReadyResponse, "description": "Not ready; `reasons` says why."}}
V1_LIST = _errors(ErrorResponse, 503)
V1_MODEL = _errors(ErrorResponse, 404, 409, 503)
V1_LOAD = _errors(ErrorResponse, 400, 403, 404, 409, 413, 422, 502, 503, 504, 507)
V1_INFER = _errors(ErrorResponse, 400, 404, 409, 413, 422, 503, 504)

# --- /v2 --------------------------------------------------------------------------------------
V2_SERVER = _errors(V2ErrorResponse, 503)  # routes that ask the coordinator for the table
V2_MODEL = _errors(V2ErrorResponse, 404, 503)  # metadata, config, statistics of one model
V2_MODEL_READY: Responses = {
    **V2_MODEL,
    400: {"model": ModelReady, "description": "The model is known but not ready (Triton's answer)."},
}
V2_INFER: Responses = {
    # The binary extension answers a JSON header followed by the raw tensors.
    200: {
        "description": "JSON, or with binary outputs the JSON header (`Inference-Header-Content-Length` "
        "bytes) followed by the tensors.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(V2ErrorResponse, 400, 404, 409, 413, 501, 503, 504),
}
V2_REPOSITORY_INDEX = _errors(V2ErrorResponse, 400, 413, 503)
V2_REPOSITORY_LOAD = _errors(V2ErrorResponse, 400, 403, 404, 409, 413, 502, 503, 504, 507)
V2_REPOSITORY_UNLOAD = _errors(V2ErrorResponse, 400, 404, 409, 413, 503)
V2_SHM = _errors(V2ErrorResponse, 400, 413, 501, 503)
