"""Bodies of the ``/v2`` routes, for the OpenAPI document only.

The inference body is documented from the msgspec Structs ``frontend/v2_codec.py``
decodes it with; the handlers of the other routes parse their bodies themselves,
so these models never validate a request; they tell a client, and a contract
test generating requests from the document, what each route reads. Names and
fields follow the Open Inference Protocol and Triton's extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import TensorSchema


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


# --- responses ----------------------------------------------------------------------------------


class Live(BaseModel):
    live: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSchema]
    outputs: list[TensorSchema]


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
