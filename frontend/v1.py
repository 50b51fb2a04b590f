"""The seed's API: health, readiness, model management and ``/v1/infer``."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ipc.messages import ModelEntry
from model_server import metrics, naming
from model_server.logs import request_id_var
from model_server.models_file import model_config_from

from . import responses
from .dispatcher import InputTensor
from .errors import ApiError
from .limits import check_inputs, check_json_size, check_rows
from .records import PayloadError, named_to_tensors, records_to_tensors, tensors_to_records
from .schemas import (
    HealthResponse,
    InferRequestV1,
    InferResponseV1,
    LoadRequest,
    ModelInfo,
    ModelList,
    ReadyResponse,
)
from .service import Service, Tracker

router = APIRouter()


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def model_info(entry: ModelEntry, state: str | None = None) -> dict[str, Any]:
    schema = entry.schema
    batching = entry.config.batching
    return {
        "model_id": entry.model_id,
        "version": entry.version,
        "state": state or entry.state,
        "reason": entry.reason,
        "registry_uri": entry.registry_uri,
        "workers": entry.workers,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in schema.inputs]
        if schema
        else [],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in schema.outputs]
        if schema
        else [],
        "feature_names": schema.feature_names if schema else None,
        "loaded_at": entry.loaded_at or None,
        "load_ms": entry.load_ms or None,
        "memory_bytes": entry.memory_bytes,
        "warmup_ms": entry.warmup_ms or None,
        "size_bytes": entry.size_bytes,
        "sha256": entry.sha256,
        "batching": {
            "max_batch_size": batching.max_batch_size,
            "max_queue_delay_us": batching.max_queue_delay_us,
            "preferred_batch_sizes": batching.preferred_batch_sizes,
            "max_queue_size": batching.max_queue_size,
        },
        "progress": entry.progress,
    }


@router.get("/health", response_model=HealthResponse, tags=["health"], summary="Liveness probe")
async def health() -> Response:
    """200 while this frontend process runs."""
    return json_response({"status": "ok"})


@router.get(
    "/ready",
    response_model=ReadyResponse,
    tags=["health"],
    summary="Readiness probe",
    responses=responses.READY,
)
async def ready(request: Request) -> Response:
    """200 when the coordinator answers, a worker is alive and every start-up model is loaded and warm."""
    body, ok = await readiness(service_of(request))
    return json_response(body, 200 if ok else 503)


async def readiness(service: Service) -> tuple[dict[str, Any], bool]:
    from .coordinator_client import CoordinatorUnavailable

    if service.draining:
        return {"ready": False, "reasons": ["server is draining"], "models": 0, "workers": 0}, False
    try:
        reply = await service.coordinator.refresh(timeout=min(1.0, service.settings.coordinator_timeout_s))
    except CoordinatorUnavailable as exc:
        return {"ready": False, "reasons": [str(exc)], "models": 0, "workers": 0}, False
    table = reply.table
    assert table is not None
    body = {
        "ready": table.ready,
        "reasons": table.reasons,
        "models": sum(1 for m in table.models if m.state == "ready"),
        "workers": sum(1 for w in table.workers if w.alive),
    }
    return body, table.ready


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Every process's metrics (multiprocess mode) plus the coordinator's table."""
    service = service_of(request)
    body = metrics.exposition(lambda: service.table.snapshot)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/models/load",
    response_model=ModelInfo,
    responses=responses.V1_LOAD,
    tags=["models"],
    summary="Load a model",
)
async def load_model(body: LoadRequest, request: Request) -> Response:
    """Load ``model_id``/``version`` from ``registry_uri`` onto the workers; idempotent.

    Concurrent loads of one model share one load. Answers when the model is ready
    (or failed: 404 not found, 403 denied, 422 not a valid ONNX model, 502/504 source down).
    """
    _check_id("model_id", body.model_id)
    _check_id("version", body.version)
    config = model_config_from(body.model_dump(exclude_none=True))
    entry = await service_of(request).load(body.model_id, body.version, body.registry_uri, config)
    return json_response(model_info(entry))


def _check_id(kind: str, value: str) -> None:
    try:
        naming.check_part(kind, value)
    except naming.InvalidName as exc:
        raise ApiError(422, "invalid_request", str(exc), {kind: value}) from None


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=responses.V1_LIST,
    tags=["models"],
    summary="List models",
)
async def list_models(request: Request) -> Response:
    """Every model the coordinator knows, in any state, with workers, schema, load time and memory."""
    service = service_of(request)
    reply = await service.coordinator.refresh()
    table = reply.table
    assert table is not None
    return json_response({"models": [model_info(e) for e in table.models]})


@router.get(
    "/v1/models/{model_id}/{version}",
    response_model=ModelInfo,
    responses=responses.V1_MODEL,
    tags=["models"],
    summary="One model",
)
async def get_model(model_id: str, version: str, request: Request) -> Response:
    entry = await service_of(request).entry(model_id, version, require_ready=False)
    return json_response(model_info(entry))


@router.delete(
    "/v1/models/{model_id}/{version}",
    response_model=ModelInfo,
    responses=responses.V1_MODEL,
    tags=["models"],
    summary="Unload a model",
)
async def unload_model(model_id: str, version: str, request: Request) -> Response:
    """Unload from every worker. Requests already running finish first; new ones get 409/404."""
    entry = await service_of(request).unload(model_id, version)
    return json_response(model_info(entry, state="unloaded"))


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferRequestV1.model_json_schema()}},
    }
}


@router.post(
    "/v1/infer",
    response_model=InferResponseV1,
    responses=responses.V1_INFER,
    openapi_extra=INFER_BODY,
    tags=["inference"],
    summary="Run inference",
)
async def infer(request: Request) -> Response:
    """Run one batch: all records (or named tensors) go to the model in a single ONNX Runtime call."""
    return await infer_v1(service_of(request), await request.body())


async def infer_v1(service: Service, body: bytes) -> Response:
    """The handler, apart from the framework: ``frontend.fastpath`` calls it directly."""
    with service.track("v1") as tracker:
        return await _infer(service, tracker, body)


async def _infer(service: Service, tracker: Tracker, raw_body: bytes) -> Response:
    settings = service.settings
    check_json_size(settings, len(raw_body))
    payload = parse_object(raw_body)
    model_id = payload.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(422, "invalid_request", "model_id: a non-empty string is required")
    version = payload.get("model_version", payload.get("version"))
    if version is not None and not isinstance(version, str):
        version = str(version)
    timeout_ms = payload.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, int | float) or timeout_ms <= 0):
        raise ApiError(422, "invalid_request", "timeout_ms: a positive number of milliseconds is expected")
    outputs = payload.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise ApiError(422, "invalid_request", "outputs: a list of output names is expected")
    entry = await service.entry(model_id, version)
    assert entry.schema is not None
    tracker.model, tracker.version = entry.model_id, entry.version
    raw_inputs = payload.get("inputs")
    # Bounded before the values are converted (records are copied column by column).
    if isinstance(raw_inputs, list):
        check_rows(settings, len(raw_inputs), "inputs")
        if raw_inputs and isinstance(raw_inputs[0], dict):
            check_inputs(settings, len(raw_inputs[0]), "features in inputs[0]")
    elif isinstance(raw_inputs, dict):
        check_inputs(settings, len(raw_inputs), "named input tensors")
        for spec in entry.schema.inputs:
            value = raw_inputs.get(spec.name)
            if spec.shape and spec.shape[0] < 0 and isinstance(value, list):
                check_rows(settings, len(value), f"input {spec.name!r}")
    try:
        if isinstance(raw_inputs, list):
            arrays = records_to_tensors(raw_inputs, entry.schema)
            rows = len(raw_inputs)
        elif isinstance(raw_inputs, dict):
            arrays = named_to_tensors(raw_inputs, entry.schema)
            first = next(iter(arrays.values()))
            rows = first.shape[0] if first.ndim else 1
        else:
            raise PayloadError("inputs: expected a list of records or an object of named tensors")
    except PayloadError as exc:
        raise ApiError(422, "invalid_input", exc.message, exc.details) from None
    known = {o.name for o in entry.schema.outputs}
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown output(s) {unknown}; the model has {sorted(known)}")
    inputs = [
        InputTensor(spec.name, spec.datatype, list(arrays[spec.name].shape), array=arrays[spec.name])
        for spec in entry.schema.inputs
    ]
    request_id = request_id_var.get()
    timeout_s = timeout_ms / 1000 if timeout_ms else None
    with await service.infer(entry, inputs, outputs, request_id, timeout_s=timeout_s) as result:
        tracker.result = result
        records, whole = tensors_to_records([(o.name, o.array()) for o in result.outputs], rows, entry.schema)
    body: dict[str, Any] = {
        "request_id": request_id,
        "model_id": entry.model_id,
        "model_version": entry.version,
        "outputs": records,
    }
    if whole:
        body["tensors"] = whole
    return json_response(body)


def parse_object(body: bytes, status: int = 422) -> dict[str, Any]:
    """A JSON object body, or the ApiError (``status``: 422 for /v1, 400 for /v2) saying what is wrong."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(status, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(status, "invalid_request", "body must be a JSON object")
    return payload
