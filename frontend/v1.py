"""The seed's API: health, readiness, model management and ``/v1/infer``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ipc.messages import ModelEntry
from model_server import metrics, naming
from model_server.logs import request_id_var
from model_server.models_file import model_config_from

from . import responses, rest, schemas
from .call import InferenceCall, execute
from .dispatcher import CallInput, CallOutput
from .errors import ApiError
from .records import tensors_to_records, to_tensors
from .rest import inference_body, json_response, service_of, tensor_specs
from .schemas import doc, request_body
from .service import Service

router = APIRouter()


def model_info(entry: ModelEntry, state: str | None = None) -> dict[str, Any]:
    schema = entry.schema
    return {
        "model_id": entry.model_id,
        "version": entry.version,
        "state": state or entry.state,
        "reason": entry.reason,
        "registry_uri": entry.registry_uri,
        "workers": entry.workers,
        "inputs": tensor_specs(schema.inputs) if schema else [],
        "outputs": tensor_specs(schema.outputs) if schema else [],
        "feature_names": schema.feature_names if schema else None,
        "loaded_at": entry.loaded_at or None,
        "load_ms": entry.load_ms or None,
        "memory_bytes": entry.memory_bytes,
        "warmup_ms": entry.warmup_ms or None,
        "size_bytes": entry.size_bytes,
        "sha256": entry.sha256,
        "batching": msgspec.structs.asdict(entry.config.batching),
        "progress": entry.progress,
    }


@router.get("/health", response_model=schemas.HealthResponse, tags=["health"], summary="Liveness probe")
async def health() -> Response:
    """200 while this frontend process runs."""
    return json_response({"status": "ok"})


router.add_api_route(
    "/ready",
    rest.ready,
    response_model=schemas.ReadyResponse,
    tags=["health"],
    summary="Readiness probe",
    responses=responses.READY,
)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Every process's metrics (multiprocess mode) plus the coordinator's table."""
    service = service_of(request)
    # Off the event loop: reading every process's files, and waiting (at most the flush
    # interval) for the other frontends' batches, would stall the requests in flight here.
    body = await asyncio.to_thread(metrics.exposition, lambda: service.table.snapshot)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/models/load",
    response_model=schemas.ModelInfo,
    responses=responses.V1_LOAD,
    tags=["models"],
    summary="Load a model",
)
async def load_model(body: schemas.LoadRequest, request: Request) -> Response:
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
    response_model=schemas.ModelList,
    responses=responses.V1_LIST,
    tags=["models"],
    summary="List models",
)
async def list_models(request: Request) -> Response:
    """Every model the coordinator knows, in any state, with workers, schema, load time and memory."""
    reply = await service_of(request).coordinator.refresh()
    assert reply.table is not None
    return json_response({"models": [model_info(e) for e in reply.table.models]})


@router.get(
    "/v1/models/{model_id}/{version}",
    response_model=schemas.ModelInfo,
    responses=responses.V1_MODEL,
    tags=["models"],
    summary="One model",
)
async def get_model(model_id: str, version: str, request: Request) -> Response:
    entry = await service_of(request).entry(model_id, version, require_ready=False)
    return json_response(model_info(entry))


@router.delete(
    "/v1/models/{model_id}/{version}",
    response_model=schemas.ModelInfo,
    responses=responses.V1_MODEL,
    tags=["models"],
    summary="Unload a model",
)
async def unload_model(model_id: str, version: str, request: Request) -> Response:
    """Unload from every worker. Requests already running finish first; new ones get 409/404."""
    entry = await service_of(request).unload(model_id, version)
    return json_response(model_info(entry, state="unloaded"))


class InferBody(msgspec.Struct):
    """The body of ``POST /v1/infer``; decoded with it, and documented from it."""

    model_id: str
    inputs: Annotated[
        Any, doc("Records (one object per row, feature -> value) or named tensors (input -> nested lists).")
    ] = None
    model_version: Annotated[str | int | float | None, doc("Omitted: the newest ready version.")] = None
    version: Annotated[str | int | float | None, doc("Same as `model_version`.")] = None
    outputs: Annotated[list[str], doc("Outputs to return (default: all).")] = []
    timeout_ms: Annotated[
        float | None,
        doc("This request's deadline (ms); shortens MODEL_SERVER_REQUEST_TIMEOUT_S, 504 past it."),
    ] = None


EXAMPLE = {
    "model_id": "fraud_detection",
    "model_version": "2.0.0",
    "inputs": [{"feature1": 1.0, "feature2": 2.0}, {"feature1": 3.0, "feature2": 4.0}],
}


@router.post(
    "/v1/infer",
    response_model=schemas.InferResponseV1,
    responses=responses.V1_INFER,
    openapi_extra=request_body(InferBody, examples=[EXAMPLE]),
    tags=["inference"],
    summary="Run inference",
)
async def infer(request: Request) -> Response:
    """Run one batch: all records (or named tensors) go to the model in a single ONNX Runtime call.

    Served by ``frontend.fastpath`` with ``infer_v1`` before FastAPI; this route documents it."""
    return await infer_v1(service_of(request), request.headers, await request.body())


async def infer_v1(service: Service, headers: Mapping[str, str], body: bytes | memoryview) -> Response:
    """One /v1 inference: decode into an ``InferenceCall``, execute, encode records."""
    with service.track("v1") as tracker:
        envelope = _envelope(inference_body(service, headers, body))
        version = next((str(v) for v in (envelope.model_version, envelope.version) if v is not None), None)
        entry = await service.entry(envelope.model_id, version)
        tracker.model, tracker.version = entry.model_id, entry.version  # bad inputs are counted per model
        assert entry.schema is not None
        arrays, rows = to_tensors(service.settings, envelope.inputs, entry.schema)
        specs = entry.schema.inputs
        inputs = [CallInput(s.name, s.datatype, list(arrays[s.name].shape), arrays[s.name]) for s in specs]
        call = InferenceCall(
            envelope.model_id,
            version,
            inputs,
            [CallOutput(name) for name in envelope.outputs],
            timeout_s=envelope.timeout_ms / 1000 if envelope.timeout_ms else None,
            request_id=request_id_var.get(),
        )
        with await execute(service, call, tracker, entry) as result:
            records, whole = tensors_to_records(
                [(o.name, o.array()) for o in result.outputs], rows, entry.schema
            )
        answer: dict[str, Any] = {
            "request_id": call.request_id,
            "model_id": result.model,
            "model_version": result.version,
            "outputs": records,
        }
        if whole:
            answer["tensors"] = whole
        return json_response(answer)


_DECODER = msgspec.json.Decoder(InferBody)


def _envelope(body: bytes | memoryview) -> InferBody:
    try:
        envelope = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_request", f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(422, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not envelope.model_id:
        raise ApiError(422, "invalid_request", "model_id: a non-empty string is required")
    if envelope.timeout_ms is not None and envelope.timeout_ms <= 0:
        raise ApiError(422, "invalid_request", "timeout_ms: a positive number of milliseconds is expected")
    return envelope
