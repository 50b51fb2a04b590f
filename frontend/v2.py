"""Open Inference Protocol (KServe V2) routes, as Triton, MLServer and KServe serve them.

Same coordinator and workers as ``/v1``; errors are ``{"error": "<message>"}``.
Extensions: binary tensor data, classification (``frontend/classification.py``),
model repository, statistics (``frontend/stats.py``), and (when
``MODEL_SERVER_ALLOW_CLIENT_SHM=true``) system shared memory. Routes with and
without ``/versions/{version}`` are one handler each (``rest.route_pair``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ipc import client_shm, datatypes
from ipc.messages import ShmRegion, TensorSpec
from model_server import __version__, naming
from model_server.logs import request_id_var
from model_server.models_file import MAX_URI_LENGTH, ModelsFileError, model_config_from
from model_server.naming import version_key

from . import responses, rest, stats, v2_codec, v2_schemas
from .call import InferenceCall, execute
from .dispatcher import BodyLease
from .errors import ApiError
from .rest import Handler, inference_body, json_response, parse_object, route_pair, service_of, tensor_specs
from .schemas import ReadyResponse, doc, request_body
from .service import Service

router = APIRouter(prefix="/v2", tags=["v2"])

PLATFORM = "onnxruntime_onnx"
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
# The region routes share a handler with their server-wide twins, which have no {name}.
REGION_NAME = {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]}


def _model_route(method: str, suffix: str = "", **options: Any) -> Callable[[Handler], Handler]:
    """``/models/{model}<suffix>`` and ``/models/{model}/versions/{version}<suffix>``: one handler."""
    return route_pair(router, method, "/models/{model}", suffix, **options)


def extensions(service: Service) -> list[str]:
    names = ["binary_tensor_data", "classification", "model_repository", "statistics"]
    if service.settings.allow_client_shm:
        names.append("system_shared_memory")
    return names


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
    return json_response(
        {"name": "model-server", "version": __version__, "extensions": extensions(service_of(request))}
    )


def _versions(service: Service, model: str) -> list[str]:
    return sorted(v for (m, v), e in service.table.models.items() if m == model and e.state == "ready")


# --- statistics extension (registered before /models/{model}, which would take "stats") ---


@router.get("/models/stats", summary="Statistics of every loaded model", responses=responses.V2_SERVER)
async def all_model_stats(request: Request) -> Response:
    service = service_of(request)
    await service.coordinator.refresh()
    keys = sorted(k for k, e in service.table.models.items() if e.state == "ready")
    return json_response(await asyncio.to_thread(stats.model_stats, keys))


@_model_route("GET", "/stats", summary="Model statistics", responses=responses.V2_MODEL)
async def model_stats(model: str, request: Request) -> Response:
    service, version = service_of(request), request.path_params.get("version")
    entry = await service.entry(model, version, require_ready=False)  # unknown: 404, no table snapshot
    await service.coordinator.refresh()  # the version list below, as the coordinator has it now
    versions = [version] if version is not None else _versions(service, model) or [entry.version]
    keys = [(entry.model_id, v) for v in versions]
    # Reading every process's metric files is blocking I/O: kept off the event loop.
    return json_response(await asyncio.to_thread(stats.model_stats, keys))


@_model_route(
    "GET", response_model=v2_schemas.ModelMetadata, summary="Model metadata", responses=responses.V2_MODEL
)
async def model_metadata(model: str, request: Request) -> Response:
    service = service_of(request)
    entry = await service.entry(model, request.path_params.get("version"), require_ready=False)
    schema = entry.schema
    return json_response(
        {
            "name": entry.model_id,
            "versions": _versions(service, model) or [entry.version],
            "platform": PLATFORM,
            "inputs": tensor_specs(schema.inputs) if schema else [],
            "outputs": tensor_specs(schema.outputs) if schema else [],
        }
    )


@_model_route(
    "GET",
    "/ready",
    response_model=v2_schemas.ModelReady,
    summary="Model ready",
    responses=responses.V2_MODEL_READY,
)
async def model_ready(model: str, request: Request) -> Response:
    version = request.path_params.get("version")
    # Asked right after an unload made through another frontend process, this process's
    # snapshot may still say ready; readiness is a control-plane call, so ask the owner
    # (for this model only: an unknown name costs no snapshot of the table).
    reply = await service_of(request).coordinator.lookup(model, version)
    if reply.status != 200 or reply.entry is None:
        what = f"{model}:{version}" if version else model
        raise ApiError(404, "model_not_found", f"model {what} is not loaded", {"model_id": model})
    entry = reply.entry
    ok = entry.state == "ready"
    body = {"name": entry.model_id, "version": entry.version, "ready": ok}
    return json_response(body, 200 if ok else 400)


TRITON_TYPES = {t: "TYPE_STRING" if t == "BYTES" else f"TYPE_{t}" for t in datatypes.KNOWN}


def _triton_io(specs: list[TensorSpec], batched: int) -> list[dict[str, Any]]:
    dims = [t.shape[1:] if batched else t.shape for t in specs]
    return [
        {"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": d}
        for t, d in zip(specs, dims, strict=True)
    ]


@_model_route("GET", "/config", summary="Model configuration (Triton-style)", responses=responses.V2_MODEL)
async def model_config(model: str, request: Request) -> Response:
    """What Triton's config endpoint returns, so perf_analyzer and tritonclient tools work."""
    entry = await service_of(request).entry(model, request.path_params.get("version"), require_ready=False)
    schema = entry.schema
    batching = entry.config.batching
    max_batch = batching.max_batch_size if schema and schema.batched else 0

    config: dict[str, Any] = {
        "name": entry.model_id,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": max_batch,
        "input": _triton_io(schema.inputs, max_batch) if schema else [],
        "output": _triton_io(schema.outputs, max_batch) if schema else [],
    }
    if max_batch:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preferred_batch_size": batching.preferred_batch_sizes,
        }
    return json_response(config)


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
        with await execute(service, call, tracker) as result:
            return v2_codec.encode(result, binary_default)


# --- model repository extension --------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    return parse_object(body, 400) if body else {}


@router.post(
    "/repository/index",
    response_model=list[v2_schemas.RepositoryItem],
    summary="Repository index",
    responses=responses.V2_REPOSITORY_INDEX,
    openapi_extra=request_body(v2_schemas.RepositoryIndexRequest, required=False),
)
async def repository_index(request: Request) -> Response:
    body = await _json_body(request)
    reply = await service_of(request).coordinator.index()
    items = [
        {"name": i.name, "version": i.version, "state": i.state, "reason": i.reason} for i in reply.index
    ]
    if body.get("ready"):
        items = [i for i in items if i["state"] == "READY"]
    return json_response(items)


# A Triton model config's batching fields: (load option, prefix in the config, field).
_CONFIG_FIELDS = (
    ("max_batch_size", "", "max_batch_size"),
    ("max_queue_delay_us", "dynamic_batching.", "max_queue_delay_microseconds"),
    ("preferred_batch_sizes", "dynamic_batching.", "preferred_batch_size"),
)


def _load_options(parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Batching options from load parameters, or from a Triton model config passed as ``config``,
    and the name each came by (for an error that names what the client sent)."""
    options = {k: v for k, v in parameters.items() if k not in {"config", "version", "registry_uri"}}
    names = {k: f"parameters.{k}" for k in options}
    raw = parameters.get("config")
    if raw:
        try:
            config = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_config", f"parameters.config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ApiError(400, "invalid_config", "parameters.config must be a JSON object")
        dynamic = config.get("dynamic_batching") or {}
        sources = {"": config, "dynamic_batching.": dynamic if isinstance(dynamic, dict) else {}}
        for option, prefix, field in _CONFIG_FIELDS:
            if field in sources[prefix] and option not in options:
                options[option] = sources[prefix][field]
                names[option] = f"parameters.config.{prefix}{field}"
    return options, names


@router.post(
    "/repository/models/{model}/load",
    response_model=v2_schemas.RepositoryLoaded,
    summary="Load a model",
    responses=responses.V2_REPOSITORY_LOAD,
    openapi_extra=request_body(v2_schemas.RepositoryLoadRequest, required=False),
)
async def repository_load(model: str, request: Request) -> Response:
    service = service_of(request)
    body = await _json_body(request)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "invalid_request", "parameters must be an object")
    version = str(parameters.get("version") or await _default_version(service, model))
    try:
        naming.check_part("model name", model)
        naming.check_part("version", version)
        options, names = _load_options(parameters)
        config = model_config_from(options, names=names)
    except (naming.InvalidName, ModelsFileError) as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    registry_uri = parameters.get("registry_uri")
    if registry_uri is not None and (not isinstance(registry_uri, str) or len(registry_uri) > MAX_URI_LENGTH):
        raise ApiError(
            400,
            "invalid_request",
            f"parameters.registry_uri: must be a string of at most {MAX_URI_LENGTH} characters",
        )
    entry = await service.load(model, version, str(registry_uri) if registry_uri else None, config)
    return json_response({"name": entry.model_id, "version": entry.version, "state": "READY"})


async def _default_version(service: Service, model: str) -> str:
    """The newest version the repository index knows for ``model``, else "1"."""
    reply = await service.coordinator.index()
    versions = [i.version for i in reply.index if i.name == model]
    return max(versions, key=version_key) if versions else "1"


@router.post(
    "/repository/models/{model}/unload",
    response_model=v2_schemas.RepositoryUnloaded,
    summary="Unload a model",
    responses=responses.V2_REPOSITORY_UNLOAD,
    openapi_extra=request_body(v2_schemas.RepositoryUnloadRequest, required=False),
)
async def repository_unload(model: str, request: Request) -> Response:
    service = service_of(request)
    body = await _json_body(request)
    parameters = body.get("parameters") or {}
    await service.coordinator.refresh()
    versions = [v for (m, v) in service.table.models if m == model]
    if isinstance(parameters, dict) and parameters.get("version"):
        versions = [v for v in versions if v == str(parameters["version"])]
    if not versions:
        raise ApiError(404, "model_not_found", f"model '{model}' is not loaded")
    for version in versions:
        await service.unload(model, version)
    return json_response({"name": model, "versions": versions, "state": "UNAVAILABLE"})


# --- system shared memory extension -------------------------------------------------------------


SHM_DISABLED = "system shared memory is disabled: set MODEL_SERVER_ALLOW_CLIENT_SHM=true to allow it"


def _require_shm(service: Service) -> None:
    if not service.settings.allow_client_shm:
        raise ApiError(501, "shm_disabled", SHM_DISABLED)


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
    _require_shm(service)
    limit = service.settings.max_shm_name_length
    if not name or len(name) > limit:
        raise ApiError(400, "bad_region", f"shared memory region name must be 1 to {limit} characters")
    try:
        body = msgspec.convert(await _json_body(request), RegisterBody, strict=True)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_region", f"register body: {exc}") from None
    key, offset, size = body.key, body.offset, body.byte_size
    try:
        object_name = client_shm.object_name(key, limit)
        if object_name.startswith("msrv_"):
            raise ApiError(400, "bad_region", f"{key!r} belongs to the server")
        # The checks every worker repeats on every use: a regular file of ours, no link, long enough.
        client_shm.check(object_name, offset, size)
    except client_shm.RegionError as exc:
        raise ApiError(400, "bad_region", str(exc)) from None
    reply = await service.coordinator.register_region(ShmRegion(name, object_name, offset, size))
    if reply.status != 200:
        raise ApiError(reply.status, reply.code or "bad_region", reply.error)
    return json_response({})


@router.post("/systemsharedmemory/unregister", summary="Unregister every region", responses=responses.V2_SHM)
@router.post(
    "/systemsharedmemory/region/{name}/unregister",
    summary="Unregister one region",
    responses=responses.V2_SHM,
    openapi_extra=REGION_NAME,
)
async def shm_unregister(request: Request) -> Response:
    service = service_of(request)
    _require_shm(service)
    await service.coordinator.unregister_region(request.path_params.get("name", ""))
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
    service = service_of(request)
    _require_shm(service)
    await service.coordinator.refresh()
    regions = service.table.regions
    name: str | None = request.path_params.get("name")
    if name is not None and name not in regions:
        raise ApiError(400, "bad_region", f"shared memory region '{name}' is not registered")
    chosen = [regions[name]] if name is not None else [regions[n] for n in sorted(regions)]
    return json_response(
        [{"name": r.name, "key": "/" + r.key, "offset": r.offset, "byte_size": r.byte_size} for r in chosen]
    )
