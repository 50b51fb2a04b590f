"""Request bodies of the ``/v2`` routes, for the OpenAPI document only.

The handlers parse their bodies themselves (``frontend/v2_codec.py``: orjson, the
binary extension, shared-memory parameters), so these models never validate a
request; they tell a client, and a contract test generating requests from the
document, what each route reads. Names and fields follow the Open Inference
Protocol and Triton's extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class RequestInput(BaseModel):
    name: str
    shape: list[int] = Field(description="Dimensions; the first is the batch for batched models.")
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_size` (binary extension), `shared_memory_region`, "
        "`shared_memory_byte_size`, `shared_memory_offset` (system shared memory).",
    )
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested (absent: binary/shm).")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`, `classification` (top k), or a shared-memory region."
    )


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
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
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output`, `timeout` (µs), as Triton reads them."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (absent: all).")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` (binary extension) or the shared-memory region written."
    )
    data: list[Any] | None = Field(None, description="Flat row-major values (absent: binary or shm).")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="Only models that are ready.")


class RepositoryLoadParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str | None = Field(None, description="Version to load (absent: the newest the index knows).")
    registry_uri: str | None = Field(None, description="Where the model is, as for `/v1/models/load`.")
    config: str | None = Field(
        None, description="A Triton model configuration as JSON (`max_batch_size`, `dynamic_batching`)."
    )
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: list[int] | None = None
    max_queue_size: int | None = None
    replicas: int | None = None
    warmup: bool | None = None


class RepositoryLoadRequest(BaseModel):
    parameters: RepositoryLoadParameters | None = None


class RepositoryUnloadParameters(BaseModel):
    version: str | None = Field(None, description="Only this version (absent: every version).")


class RepositoryUnloadRequest(BaseModel):
    parameters: RepositoryUnloadParameters | None = None


class SharedMemoryRegister(BaseModel):
    key: str = Field(description="The POSIX shared-memory object's name, e.g. `/input0`.")
    offset: int = Field(0, ge=0, description="Where the region starts in the object.")
    byte_size: int = Field(gt=0, description="Size of the region in bytes.")


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


def body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the JSON request body, self-contained."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inline(schema, schema.get("$defs", {}))}},
        }
    }


# --- responses ----------------------------------------------------------------------------------


class Live(BaseModel):
    live: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


class RepositoryItem(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNAVAILABLE, ...")
    reason: str


class RepositoryLoaded(BaseModel):
    name: str
    version: str
    state: Literal["READY"]


class RepositoryUnloaded(BaseModel):
    name: str
    versions: list[str]
    state: Literal["UNAVAILABLE"]


class SharedMemoryStatus(BaseModel):
    name: str
    key: str
    offset: int
    byte_size: int
