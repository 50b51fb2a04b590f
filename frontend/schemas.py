"""Pydantic models of the HTTP API: request validation at the edge and the OpenAPI documents.

Tensor payloads are *documented* with these models but parsed with orjson on
the hot path (pydantic on megabyte bodies costs more than the model).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from model_server.models_file import (
    MAX_BATCH_SIZE,
    MAX_PREFERRED_BATCH_SIZES,
    MAX_QUEUE_DELAY_US,
    MAX_QUEUE_SIZE,
    MAX_REPLICAS,
    MAX_URI_LENGTH,
)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `model_not_found`.")
    message: str = Field(description="What went wrong, for humans.")
    request_id: str = Field(description="The request's X-Request-ID.")
    details: dict[str, Any] = Field(
        default_factory=dict, description="Structured context (feature, row, ...)."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    error: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    reasons: list[str] = Field(
        default_factory=list, description="Why the server is not ready (empty when ready)."
    )
    models: int = Field(0, description="Models in state ready.")
    workers: int = Field(0, description="Workers alive.")


class LoadRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model_id": "fraud_detection",
                "version": "2.0.0",
                "registry_uri": "s3://bucket/models/fraud_detection/2.0.0",
            }
        },
    )

    model_id: str = Field(min_length=1, max_length=128, description="Model name.")
    version: str = Field("1", min_length=1, max_length=128, description="Model version.")
    registry_uri: str | None = Field(
        None,
        max_length=MAX_URI_LENGTH,
        description="Where the model is: a path, file://, s3://, models:/, runs:/ or mlflow-artifacts:/. "
        "Omitted: MLflow if MLFLOW_TRACKING_URI is set, else s3://$AWS_S3_BUCKET/models/<id>/<version>/, "
        "else the local model repository.",
    )
    max_batch_size: int | None = Field(
        None, ge=0, le=MAX_BATCH_SIZE, description="Rows per merged batch (0: no dynamic batching)."
    )
    max_queue_delay_us: int | None = Field(
        None, ge=0, le=MAX_QUEUE_DELAY_US, description="Longest wait to fill a batch (µs)."
    )
    preferred_batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]] | None = Field(
        None, max_length=MAX_PREFERRED_BATCH_SIZES, description="Batch sizes to cut at when reached."
    )
    max_queue_size: int | None = Field(
        None, ge=1, le=MAX_QUEUE_SIZE, description="Queued requests before 503 + Retry-After."
    )
    replicas: int | None = Field(
        None, ge=0, le=MAX_REPLICAS, description="Workers that load the model (0: all)."
    )
    warmup: bool = Field(True, description="Run one inference on zeros before reporting ready.")


class TensorSchema(BaseModel):
    name: str
    datatype: str = Field(description="Open Inference Protocol datatype (FP32, INT64, BYTES, ...).")
    shape: list[int] = Field(description="Dimensions; -1 marks a variable one (the batch).")


class ModelInfo(BaseModel):
    model_id: str
    version: str
    state: Literal["downloading", "loading", "ready", "failed", "unloading", "unloaded"]
    reason: str = Field("", description="Why a load failed.")
    registry_uri: str = ""
    workers: list[int] = Field(default_factory=list, description="Workers holding a ready session.")
    inputs: list[TensorSchema] = Field(default_factory=list)
    outputs: list[TensorSchema] = Field(default_factory=list)
    feature_names: list[str] | None = Field(None, description="Record fields, in the model's column order.")
    loaded_at: float | None = Field(None, description="Unix time the model became ready.")
    load_ms: float | None = Field(None, description="Time from the load request to ready, ms.")
    memory_bytes: int = Field(0, description="Resident memory of the model in one worker.")
    warmup_ms: float | None = Field(None, description="Warm-up inference time (none: not warmed).")
    size_bytes: int = Field(0, description="Size of the ONNX file.")
    sha256: str = ""
    batching: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, float] = Field(
        default_factory=dict, description="Download progress while downloading."
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class InferResponseV1(BaseModel):
    request_id: str
    model_id: str
    model_version: str
    outputs: list[dict[str, Any]] = Field(description="One record per input row: output name -> value.")
    tensors: dict[str, Any] = Field(
        default_factory=dict, description="Outputs without a row dimension, returned whole (rare)."
    )


def doc(description: str) -> msgspec.Meta:
    """A field's description in the OpenAPI document of a msgspec Struct."""
    return msgspec.Meta(description=description)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every local ``$ref`` replaced by its definition (these models do not recurse)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def request_body(model: Any, required: bool = True, examples: list[Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` (a pydantic model, or the msgspec Struct a handler
    decodes the body with) as the JSON request body, self-contained."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        schema = model.model_json_schema()
    else:
        schema = msgspec.json.schema(model)
    schema = _inline(schema, schema.get("$defs", {}))
    if examples:
        schema["examples"] = examples
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
