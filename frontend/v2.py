"""Open Inference Protocol (KServe V2) routes, as Triton, MLServer and KServe serve them.

Same coordinator and workers as ``/v1``; errors are ``{"error": "<message>"}``.
Extensions: binary tensor data, classification (``frontend/classification.py``),
model repository, statistics (``frontend/stats.py``), and (when
``MODEL_SERVER_ALLOW_CLIENT_SHM=true``) system shared memory. Routes with and
without ``/versions/{version}`` are one handler each (``_model_route``). Beyond
inference, each route answers what ``frontend.control`` returns, as gRPC does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from model_server.logs import request_id_var

from . import control, responses, rest, v2_codec, v2_schemas
from .call import InferenceCall, execute
from .dispatcher import BodyLease
from .errors import ApiError
from .rest import inference_body, json_response, service_of
from .schemas import ReadyResponse, doc, request_body
from .service import Service

router = APIRouter(prefix="/v2", tags=["v2"])
Handler = TypeVar("Handler", bound=Callable[..., Any])

INFER_EXAMPLES = [
    {
        "id": "42",
        "inputs": [
            {"name": "feature1", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 3.0]},
            {"name": "feature2", "shape": [2, 1], "datatype": "FP32", "data": [1.5, -1.0]},
        ],
    },
    {  # zero rows are valid: the outputs have zero rows too, as onnxruntime answers
        "id": "no-rows",
        "inputs": [
            {"name": "feature1", "shape": [0, 1], "datatype": "FP32", "data": []},
            {"name": "feature2", "shape": [0, 1], "datatype": "FP32", "data": []},
        ],
    },
]
INFER_BODY = request_body(v2_codec.InferRequest, examples=INFER_EXAMPLES)
VERSION_PARAMETER = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
# The region routes share a handler with their server-wide twins, which have no {name}.
REGION_NAME = {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]}


def _model_route(method: str, suffix: str = "", **options: Any) -> Callable[[Handler], Handler]:
    """One handler on ``/models/{model}<suffix>`` and ``/models/{model}/versions/{version}<suffix>``,
    as MLServer registers its V2 routes; the handler reads ``request.path_params.get("version")``."""

    def register(handler: Handler) -> Handler:
        router.add_api_route(f"/models/{{model}}{suffix}", handler, methods=[method], **options)
        extra = {**options.pop("openapi_extra", {}), "parameters": [VERSION_PARAMETER]}
        path = f"/models/{{model}}/versions/{{version}}{suffix}"
        router.add_api_route(path, handler, methods=[method], openapi_extra=extra, **options)
        return handler

    return register


# --- health and metadata ----------------------------------------------------------------


@router.get("/health/live", response_model=v2_schemas.Live, summary="Server live")
async def live() -> Response:
    return json_response({"live": True})


router.add_api_route(
    "/health/ready",
    rest.ready,
    response_model=ReadyResponse,
    summary="Server ready",
    responses=responses.READY,
)


@router.get("", response_model=v2_schemas.ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return json_response(control.server_metadata(service_of(request)))


# --- statistics extension (registered before /models/{model}, which would take "stats") ---


@router.get("/models/stats", summary="Statistics of every loaded model", responses=responses.V2_SERVER)
async def all_model_stats(request: Request) -> Response:
    return json_response(await control.statistics(service_of(request), None, None))


@_model_route("GET", "/stats", summary="Model statistics", responses=responses.V2_MODEL)
async def model_stats(model: str, request: Request) -> Response:
    version = request.path_params.get("version")
    return json_response(await control.statistics(service_of(request), model, version))


@_model_route(
    "GET", response_model=v2_schemas.ModelMetadata, summary="Model metadata", responses=responses.V2_MODEL
)
async def model_metadata(model: str, request: Request) -> Response:
    version = request.path_params.get("version")
    return json_response(await control.model_metadata(service_of(request), model, version))


@_model_route(
    "GET",
    "/ready",
    response_model=v2_schemas.ModelReady,
    summary="Model ready",
    responses=responses.V2_MODEL_READY,
)
async def model_ready(model: str, request: Request) -> Response:
    version = request.path_params.get("version")
    entry = await control.model_ready(service_of(request), model, version)
    if entry is None:
        what = f"{model}:{version}" if version else model
        raise ApiError(404, "model_not_found", f"model {what} is not loaded", {"model_id": model})
    ok = entry.state == "ready"
    return json_response({"name": entry.model_id, "version": entry.version, "ready": ok}, 200 if ok else 400)


@_model_route("GET", "/config", summary="Model configuration (Triton-style)", responses=responses.V2_MODEL)
async def model_config(model: str, request: Request) -> Response:
    version = request.path_params.get("version")
    return json_response(await control.model_config(service_of(request), model, version))


# --- inference -------------------------------------------------------------------------------


@_model_route(
    "POST",
    "/infer",
    summary="Inference",
    response_model=v2_schemas.InferenceResponse,
    responses=responses.V2_INFER,
    openapi_extra=INFER_BODY,
)
async def infer(model: str, request: Request) -> Response:
    """Documents the route: ``frontend.fastpath`` serves it with ``infer_v2`` before FastAPI."""
    version, body = request.path_params.get("version"), await request.body()
    return await infer_v2(service_of(request), model, version, request.headers, body)


async def infer_v2(
    service: Service,
    model: str,
    version: str | None,
    headers: Mapping[str, str],
    body: bytes | memoryview,
    lease: BodyLease | None = None,
) -> Response:
    """One V2 inference: decode into an ``InferenceCall``, execute, encode. ``lease``: the arena
    slot ``frontend.fastpath`` streamed a binary body into."""
    with service.track("v2") as tracker:
        length = v2_codec.header_length(headers)
        body = inference_body(service, headers, body, length)
        # 404/409/503 for a model not ready before the body's own errors, as before any tensor is read.
        entry = await service.entry(model, version)
        tracker.model, tracker.version = entry.model_id, entry.version  # bad inputs are counted per model
        call = InferenceCall(model, version, [], request_id=request_id_var.get(), lease=lease)
        binary_default = v2_codec.decode(body, length, call, service.settings.allow_client_shm)
        with await execute(service, call, tracker, entry) as result:
            return v2_codec.encode(result, binary_default)


# --- model repository extension --------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON object body ({} when empty), or the 400 saying what is wrong."""
    body = await request.body()
    if not body:
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return payload


@router.post(
    "/repository/index",
    response_model=list[v2_schemas.RepositoryItem],
    summary="Repository index",
    responses=responses.V2_REPOSITORY_INDEX,
    openapi_extra=request_body(v2_schemas.RepositoryIndexRequest, required=False),
)
async def repository_index(request: Request) -> Response:
    body = await _json_body(request)
    return json_response(await control.repository_index(service_of(request), bool(body.get("ready"))))


@router.post(
    "/repository/models/{model}/load",
    response_model=v2_schemas.RepositoryLoaded,
    summary="Load a model",
    responses=responses.V2_REPOSITORY_LOAD,
    openapi_extra=request_body(v2_schemas.RepositoryLoadRequest, required=False),
)
async def repository_load(model: str, request: Request) -> Response:
    parameters = (await _json_body(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "invalid_request", "parameters must be an object")
    entry = await control.repository_load(service_of(request), model, parameters)
    return json_response({"name": entry.model_id, "version": entry.version, "state": "READY"})


@router.post(
    "/repository/models/{model}/unload",
    response_model=v2_schemas.RepositoryUnloaded,
    summary="Unload a model",
    responses=responses.V2_REPOSITORY_UNLOAD,
    openapi_extra=request_body(v2_schemas.RepositoryUnloadRequest, required=False),
)
async def repository_unload(model: str, request: Request) -> Response:
    parameters = (await _json_body(request)).get("parameters") or {}
    version = str(parameters.get("version") or "") if isinstance(parameters, dict) else ""
    versions = await control.repository_unload(service_of(request), model, version or None)
    return json_response({"name": model, "versions": versions, "state": "UNAVAILABLE"})


# --- system shared memory extension -------------------------------------------------------------


class RegisterBody(msgspec.Struct):
    """Triton's register body; strict, so ``"offset": true`` or ``"byte_size": 1.5`` is a 400."""

    key: Annotated[str, doc("The POSIX shared-memory object's name, e.g. `/input0`.")]
    byte_size: Annotated[int, msgspec.Meta(gt=0, description="Size of the region in bytes.")]
    offset: Annotated[int, msgspec.Meta(ge=0, description="Where the region starts in the object.")] = 0


@router.post(
    "/systemsharedmemory/region/{name}/register",
    summary="Register a shared-memory region",
    responses=responses.V2_SHM,
    openapi_extra=request_body(RegisterBody),
)
async def shm_register(name: str, request: Request) -> Response:
    service = service_of(request)
    control.check_region_name(service, name)  # before the body, whatever it holds
    try:
        body = msgspec.convert(await _json_body(request), RegisterBody, strict=True)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_region", f"register body: {exc}") from None
    await control.register_region(service, name, body.key, body.offset, body.byte_size)
    return json_response({})


@router.post("/systemsharedmemory/unregister", summary="Unregister every region", responses=responses.V2_SHM)
@router.post(
    "/systemsharedmemory/region/{name}/unregister",
    summary="Unregister one region",
    responses=responses.V2_SHM,
    openapi_extra=REGION_NAME,
)
async def shm_unregister(request: Request) -> Response:
    await control.unregister_region(service_of(request), request.path_params.get("name", ""))
    return json_response({})


@router.get(
    "/systemsharedmemory/status",
    response_model=list[v2_schemas.SharedMemoryStatus],
    summary="Every registered region",
    responses=responses.V2_SHM,
)
@router.get(
    "/systemsharedmemory/region/{name}/status",
    response_model=list[v2_schemas.SharedMemoryStatus],
    summary="One region",
    responses=responses.V2_SHM,
    openapi_extra=REGION_NAME,
)
async def shm_status(request: Request) -> Response:
    return json_response(await control.region_status(service_of(request), request.path_params.get("name")))
