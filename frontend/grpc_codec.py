"""KServe V2 / Triton gRPC messages to and from the protocol-neutral ``InferenceCall``.

Pure functions, no server. Raw tensors are never touched element by element: the bytes
protobuf parsed are what the dispatcher copies into the arena (the one copy on the way
in), and each output leaves shared memory in one ``bytes`` copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from ipc import datatypes

from .call import (
    CallResult,
    InferenceCall,
    bad,
    classification_param,
    region_param,
    timeout_param,
)
from .dispatcher import CallInput, CallOutput
from .grpc import grpc_service_pb2 as pb

# Triton's codes for its own error kinds; 409 (a model unloading or failed) is what Triton
# reports as "not ready": UNAVAILABLE.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.UNAVAILABLE,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Which repeated field of InferTensorContents carries each datatype (FP16/BF16 have none:
# they travel only as raw_input_contents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


def parameter_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= max(dim, 0)
    return count


def typed_input(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> CallInput:
    """An input sent as typed ``contents``: converted once by numpy (BYTES: packed as raw)."""
    where = f"input '{tensor.name}'"
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise bad(f"{where}: datatype {tensor.datatype!r} has no typed contents; send raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != _count(shape):
        raise bad(f"{where}: {len(values)} {field} elements do not match shape {shape}")
    if tensor.datatype == "BYTES":
        items = np.empty(len(values), dtype=object)
        items[:] = list(values)
        return CallInput(tensor.name, "BYTES", shape, raw=datatypes.serialize_bytes(items))
    dtype = datatypes.numpy_dtype(tensor.datatype)
    if dtype.kind not in "iu":
        return CallInput(
            tensor.name, tensor.datatype, shape, array=np.array(values, dtype=dtype).reshape(shape)
        )
    # INT8/16 and UINT8/16 travel in 32-bit fields: a value that does not fit is the client's
    # error, not something to wrap around silently.
    wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
    info = np.iinfo(dtype)  # type: ignore[type-var]  # an integer dtype: kind checked above
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise bad(f"{where}: a value of {field} is out of range for {tensor.datatype}")
    return CallInput(tensor.name, tensor.datatype, shape, array=wide.astype(dtype).reshape(shape))


def decode_inputs(request: pb.ModelInferRequest, shm_enabled: bool) -> list[CallInput]:
    """Inputs in request order; ``raw_input_contents`` go, in order, to the inputs that carry
    neither a shared-memory region nor typed contents (as tritonclient sends them)."""
    raw = request.raw_input_contents
    taken = 0
    inputs: list[CallInput] = []
    for tensor in request.inputs:
        where = f"input '{tensor.name}'"
        shape = list(tensor.shape)
        region = region_param(parameters(tensor.parameters), where, shm_enabled)
        has_contents = tensor.HasField("contents")
        if region is not None:
            if has_contents:
                raise bad(f"{where}: both shared_memory_region and contents are given")
            inputs.append(CallInput(tensor.name, tensor.datatype, shape, region=region))
        elif has_contents:
            if raw:
                raise bad(f"{where}: contents and raw_input_contents cannot be mixed in one request")
            inputs.append(typed_input(tensor, shape))
        elif taken < len(raw):
            inputs.append(CallInput(tensor.name, tensor.datatype, shape, raw=raw[taken]))
            taken += 1
        else:
            raise bad(f"{where} has no data: no contents, raw_input_contents or shared_memory_region")
    if taken != len(raw):
        raise bad(f"{len(raw)} raw_input_contents given for {taken} input(s) without other data")
    return inputs


def decode_output(output: pb.ModelInferRequest.InferRequestedOutputTensor, shm_enabled: bool) -> CallOutput:
    where = f"output '{output.name}'"
    params = parameters(output.parameters)
    return CallOutput(
        output.name, None, classification_param(params, where), region_param(params, where, shm_enabled)
    )


def decode_infer(
    request: pb.ModelInferRequest, shm_enabled: bool, request_id: str, timeout_s: float | None
) -> InferenceCall:
    """The ``InferenceCall`` of one ``ModelInferRequest``; ``timeout_s`` is the gRPC deadline's rest."""
    params = parameters(request.parameters)
    asked = timeout_param(params)
    if asked is not None and (timeout_s is None or asked < timeout_s):
        timeout_s = asked  # the tighter of the request's parameter and the gRPC deadline
    return InferenceCall(
        request.model_name,
        request.model_version or None,
        decode_inputs(request, shm_enabled),
        [decode_output(o, shm_enabled) for o in request.outputs],
        params,
        timeout_s,
        request_id,
        request.id or None,
    )


def encode_result(result: CallResult) -> pb.ModelInferResponse:
    """One ``raw_output_contents`` entry per output, in output order (empty for an output written
    into the client's region), so tritonclient's ``as_numpy`` finds each by its index."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.version, id=result.id or ""
    )
    raw = response.raw_output_contents
    for tensor in result.outputs:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        spec = tensor.requested
        if spec is not None and spec.region is not None:
            out.parameters["shared_memory_region"].string_param = spec.region.name
            out.parameters["shared_memory_byte_size"].int64_param = tensor.nbytes
            out.parameters["shared_memory_offset"].int64_param = spec.region.offset
            raw.append(b"")
        elif tensor.classes is not None:
            raw.append(datatypes.serialize_bytes(tensor.classes))
        else:
            assert tensor.data is not None
            raw.append(bytes(tensor.data))  # out of shared memory before the slot is freed
    return response


def error_stream_response(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed request on ``ModelStreamInfer``: the stream stays open, the error names the request."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
