"""Open Inference Protocol (KServe V2) REST bodies, with Triton's binary and shared-memory
extensions: decoded into an ``InferenceCall``, encoded from a ``CallResult``.

The JSON envelope is decoded by msgspec Structs (wrong types are 400s naming the
field); each input's ``data`` stays raw JSON text until ``call.execute`` has checked
the call against the model and converts it (``frontend/tensors.py``).

Binary tensor extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw little-endian tensor
bytes, in input order, for each input whose ``parameters.binary_data_size`` is
set. BYTES elements are a 4-byte little-endian length then the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
import orjson
from starlette.responses import Response

from ipc import datatypes

from .call import CallResult, InferenceCall, bad, classification_param, int_param, region_param, timeout_param
from .dispatcher import CallInput, CallOutput, ResultTensor
from .errors import ApiError
from .rest import RawResponse
from .schemas import doc
from .tensors import to_json

HEADER_LENGTH = "inference-header-content-length"


class RequestInput(msgspec.Struct):
    name: str
    datatype: Annotated[str, doc("FP32, INT64, BYTES, ... (Open Inference Protocol datatypes).")]
    shape: Annotated[list[int], doc("Dimensions; the first is the batch for batched models.")]
    parameters: Annotated[
        dict[str, Any], doc("`binary_data_size`, or `shared_memory_region`, `_byte_size`, `_offset`.")
    ] = {}
    # Kept as JSON text: converted (or not) only once the call has passed its checks.
    data: Annotated[msgspec.Raw, doc("Row-major values, flat or nested (absent: binary/shm).")] = (
        msgspec.field(default_factory=msgspec.Raw)
    )


class RequestOutput(msgspec.Struct):
    name: str
    parameters: Annotated[
        dict[str, Any], doc("`binary_data`, `classification` (top k), or a shm region.")
    ] = {}


class InferRequest(msgspec.Struct):
    """The body of ``POST /v2/models/{model}[/versions/{version}]/infer`` (its JSON header)."""

    inputs: list[RequestInput]
    id: str | int | float | None = None
    parameters: Annotated[
        dict[str, Any], doc("`binary_data_output`, `timeout` (µs), as Triton reads them.")
    ] = {}
    outputs: Annotated[list[RequestOutput], doc("Outputs to return (absent: all).")] = []


_DECODER = msgspec.json.Decoder(InferRequest)


def header_length(headers: Mapping[str, str]) -> int | None:
    """``Inference-Header-Content-Length``: None for a plain JSON body."""
    raw = headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_header", f"Inference-Header-Content-Length {raw!r} is not a number"
        ) from None


def decode(body: bytes | memoryview, length: int | None, call: InferenceCall, shm_enabled: bool) -> bool:
    """Fill ``call`` (model, version, request id and lease already set) from an infer body;
    True when outputs not named should come back binary (``parameters.binary_data_output``)."""
    if length is not None and not 0 <= length <= len(body):
        raise bad(f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes")
    header = body if length is None else memoryview(body)[:length]
    binary = memoryview(b"") if length is None else memoryview(body)[length:]
    try:
        request = _DECODER.decode(header)
    except msgspec.ValidationError as exc:
        raise bad(f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        hint = " (is Inference-Header-Content-Length right?)" if length is not None else ""
        raise bad(f"request header is not valid JSON{hint}: {exc}") from None
    if not request.inputs:
        raise bad("request needs a non-empty 'inputs' list")
    pos = 0
    for item in request.inputs:
        tensor, pos = _input(item, binary, pos, shm_enabled)
        if tensor.raw is not None and call.lease is not None:
            # Already in shared memory where the body was streamed: referenced, not copied.
            tensor.arena_offset = call.lease.base + (length or 0) + pos - len(tensor.raw)
        call.inputs.append(tensor)
    if pos != len(binary):
        raise bad(f"{len(binary) - pos} binary bytes after the header belong to no input")
    binary_default = bool(request.parameters.get("binary_data_output", False))
    call.outputs = [_output(item, binary_default, shm_enabled) for item in request.outputs]
    call.parameters = request.parameters
    call.timeout_s = timeout_param(request.parameters)
    call.id = str(request.id) if request.id is not None else None
    return binary_default


def _input(item: RequestInput, binary: memoryview, pos: int, shm_enabled: bool) -> tuple[CallInput, int]:
    where = f"input '{item.name}'"
    params = item.parameters
    tensor = CallInput(item.name, item.datatype, item.shape, region=region_param(params, where, shm_enabled))
    if tensor.region is not None:
        return tensor, pos
    if "binary_data_size" in params:
        size = int_param(params, "binary_data_size", where, required=True)
        if pos + size > len(binary):
            raise bad(
                f"{where}: binary_data_size {size} runs past the {len(binary)} binary bytes after the header"
            )
        tensor.raw = binary[pos : pos + size]
        pos += size
    elif len(item.data):
        tensor.json = item.data
    return tensor, pos


def _output(item: RequestOutput, binary_default: bool, shm_enabled: bool) -> CallOutput:
    where = f"output '{item.name}'"
    params = item.parameters
    binary = bool(params.get("binary_data", binary_default))
    return CallOutput(
        item.name, binary, classification_param(params, where), region_param(params, where, shm_enabled)
    )


# --- the response --------------------------------------------------------------------------


def encode(result: CallResult, binary_default: bool) -> Response:
    """The JSON body, or with any binary output the JSON header then the tensors.

    The join is the one copy of binary outputs: from shared memory into the response.
    """
    binary: list[memoryview] = []
    outputs = [_output_entry(tensor, binary_default, binary) for tensor in result.outputs]
    head: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if result.id is not None:
        head["id"] = result.id
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return RawResponse(header, b"application/json")
    return RawResponse(
        b"".join([header, *binary]),
        b"application/octet-stream",
        headers=((b"inference-header-content-length", b"%d" % len(header)),),
    )


def _output_entry(tensor: ResultTensor, binary_default: bool, binary: list[memoryview]) -> dict[str, Any]:
    spec = tensor.requested
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
    wants_binary = spec.binary if spec is not None else binary_default
    if spec is not None and spec.region is not None:
        entry["parameters"] = {
            "shared_memory_region": spec.region.name,
            "shared_memory_byte_size": tensor.nbytes,
            "shared_memory_offset": spec.region.offset,
        }
    elif wants_binary:
        classes = tensor.classes
        data = tensor.data if classes is None else memoryview(datatypes.serialize_bytes(classes))
        assert data is not None  # None only for an output written into the client's region
        entry["parameters"] = {"binary_data_size": len(data)}
        binary.append(data)
    else:
        entry["data"] = to_json(tensor.array(), tensor.datatype)
    return entry
