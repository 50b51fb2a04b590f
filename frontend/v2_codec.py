"""Open Inference Protocol (KServe V2) bodies, with Triton's binary and shared-memory extensions.

Pure functions over bytes and dicts, so malformed bodies are tested without a
server. Every problem is a ``ProtocolError`` whose message says what is wrong
with which tensor; the route answers it with 400 (or 501 for unsupported
features) and ``{"error": "<message>"}``.

Binary tensor extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw little-endian tensor
bytes, in input order, for each input whose ``parameters.binary_data_size`` is
set. BYTES elements are a 4-byte little-endian length then the bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ipc import datatypes
from ipc.messages import ModelSchema, TensorSpec

Array = npt.NDArray[Any]


class ProtocolError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class ParsedInput:
    name: str
    datatype: str
    shape: list[int]
    array: Array | None = None  # JSON data
    raw: memoryview | None = None  # binary extension
    raw_offset: int = 0  # where ``raw`` starts in the body
    region: str | None = None  # shared-memory region name
    region_offset: int = 0
    region_size: int = 0


@dataclass
class ParsedOutput:
    name: str
    binary: bool
    classification: int = 0  # top k classes instead of the tensor (classification extension)
    region: str | None = None
    region_offset: int = 0
    region_size: int = 0


@dataclass
class ParsedRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[ParsedInput]
    outputs: list[ParsedOutput]  # empty: every output
    binary_default: bool  # parameters.binary_data_output
    timeout_s: float | None = None
    unknown_outputs: list[str] = field(default_factory=list)


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"{where}: shape must be a list of integers")
    if any(d < 0 for d in value):
        raise ProtocolError(f"{where}: shape {value} has a negative dimension")
    return value


def _flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested lists (the protocol allows nested or flat data)."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [data]
    # Iterative depth-first walk keeps row-major order without recursion limits.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def json_array(data: Any, datatype: str, shape: list[int], where: str) -> Array:
    """An array of ``datatype`` and ``shape`` from nested or flat JSON data.

    numpy converts the nested lists in C (a 150,000-value image in milliseconds);
    the element-by-element Python checks run only to explain a failure.
    """
    count = _count(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise ProtocolError(f"{where}: {len(flat)} values do not fill shape {shape} ({count} elements)")
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [v.encode("utf-8") for v in flat]
        return arr.reshape(shape)
    dtype = datatypes.OIP_TO_NUMPY[datatype]
    try:
        probe = np.asarray(data)
    except ValueError:
        probe = np.asarray(_flatten(data), dtype=object)  # ragged: counted (and rejected) below
    if probe.size != count or (probe.dtype == object and len(_flatten(data)) != count):
        size = len(_flatten(data))
        raise ProtocolError(f"{where}: {size} values do not fill shape {shape} ({count} elements)")
    kind = probe.dtype.kind
    if datatype == "BOOL":
        if kind != "b" and probe.size:  # [] parses as float64: zero elements of any type are valid
            raise ProtocolError(f"{where}: BOOL data must be true/false")
    elif kind not in "iuf":
        # Strings, nulls, booleans (kind "b") or a mix: not numbers.
        raise ProtocolError(f"{where}: {datatype} data must be numbers")
    if dtype.kind in "iu" and probe.size:
        if kind == "f" and not (np.all(np.isfinite(probe)) and np.all(probe == np.floor(probe))):
            raise ProtocolError(f"{where}: {datatype} data must be integers")
        info = np.iinfo(dtype.type)  # type: ignore[type-var]
        if probe.min() < info.min or probe.max() > info.max:
            raise ProtocolError(f"{where}: data does not fit {datatype} [{info.min}, {info.max}]")
    return probe.astype(dtype, copy=False).reshape(shape)


def _check_against_model(name: str, datatype: str, shape: list[int], spec: TensorSpec | None) -> None:
    if spec is None:
        raise ProtocolError(f"unexpected inference input '{name}' for the model")
    if datatype != spec.datatype:
        raise ProtocolError(f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}")
    if len(shape) != len(spec.shape) or any(
        w >= 0 and w != g for w, g in zip(spec.shape, shape, strict=False)
    ):
        raise ProtocolError(f"input '{name}': shape {shape} does not match the model's {spec.shape}")


def parse_request(
    body: bytes | memoryview,
    header_length: int | None,
    schema: ModelSchema,
    shm_enabled: bool,
    max_rows: int | None = None,
    max_inputs: int | None = None,
) -> ParsedRequest:
    """Parse and check an infer request against the model schema (no shared-memory lookups here).

    ``max_rows`` bounds the batch dimension (an input's first dimension where the model leaves it
    open) and ``max_inputs`` the number of inputs: 413 above, before any data is converted.
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        hint = " (is Inference-Header-Content-Length right?)" if header_length is not None else ""
        raise ProtocolError(f"request header is not valid JSON{hint}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("request body must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    if max_inputs is not None and len(raw_inputs) > max_inputs:
        raise ProtocolError(
            f"{len(raw_inputs)} inputs exceed MODEL_SERVER_MAX_INPUTS_PER_REQUEST={max_inputs}", 413
        )
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    specs = {s.name: s for s in schema.inputs}
    inputs: list[ParsedInput] = []
    pos = 0
    seen: set[str] = set()
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"inputs[{i}] needs a 'name'")
        name = item["name"]
        where = f"input '{name}'"
        if name in seen:
            raise ProtocolError(f"{where} appears twice")
        seen.add(name)
        datatype = item.get("datatype")
        if datatype not in datatypes.KNOWN:
            raise ProtocolError(f"{where}: unknown datatype {datatype!r}")
        if datatype not in datatypes.SUPPORTED:
            raise ProtocolError(f"{where}: datatype {datatype} is not supported", 501)
        shape = _shape(item.get("shape"), where)
        _check_against_model(name, datatype, shape, specs.get(name))
        if max_rows is not None and shape and specs[name].shape[0] < 0 and shape[0] > max_rows:
            raise ProtocolError(
                f"{where}: {shape[0]} rows exceed MODEL_SERVER_MAX_ROWS_PER_REQUEST={max_rows}", 413
            )
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{where}: 'parameters' must be an object")
        parsed = ParsedInput(name, datatype, shape)
        if "shared_memory_region" in params:
            if not shm_enabled:
                raise ProtocolError("system shared memory is disabled (MODEL_SERVER_ALLOW_CLIENT_SHM)", 501)
            parsed.region = str(params["shared_memory_region"])
            parsed.region_size = _int_param(params, "shared_memory_byte_size", where, required=True)
            parsed.region_offset = _int_param(params, "shared_memory_offset", where)
            if datatype != "BYTES" and parsed.region_size != datatypes.nbytes_of(datatype, shape):
                raise ProtocolError(
                    f"{where}: shared_memory_byte_size {parsed.region_size} does not match shape {shape} "
                    f"of {datatype} ({datatypes.nbytes_of(datatype, shape)} bytes)"
                )
        elif "binary_data_size" in params:
            size = _int_param(params, "binary_data_size", where, required=True)
            if pos + size > len(binary):
                raise ProtocolError(
                    f"{where}: binary_data_size {size} runs past the {len(binary)} "
                    "binary bytes after the header"
                )
            chunk = binary[pos : pos + size]
            pos += size
            if datatype == "BYTES":
                try:
                    datatypes.deserialize_bytes(chunk, _count(shape))
                except ValueError as exc:
                    raise ProtocolError(f"{where}: {exc}") from None
            elif size != datatypes.nbytes_of(datatype, shape):
                raise ProtocolError(
                    f"{where}: binary_data_size {size} does not match shape {shape} of {datatype} "
                    f"({datatypes.nbytes_of(datatype, shape)} bytes)"
                )
            parsed.raw = chunk
            parsed.raw_offset = (header_length or 0) + pos - size
        elif "data" in item:
            parsed.array = json_array(item["data"], datatype, shape, where)
        else:
            raise ProtocolError(f"{where} has no data, binary_data_size or shared_memory_region")
        inputs.append(parsed)
    if pos != len(binary):
        raise ProtocolError(f"{len(binary) - pos} binary bytes after the header belong to no input")
    missing = sorted(set(specs) - seen)
    if missing:
        raise ProtocolError(f"missing input(s) {missing} for the model")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs: list[ParsedOutput] = []
    known_outputs = {o.name for o in schema.outputs}
    raw_outputs = header.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise ProtocolError("'outputs' must be a list")
    for i, item in enumerate(raw_outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{i}] needs a 'name'")
        name = item["name"]
        if name not in known_outputs:
            raise ProtocolError(f"unexpected inference output '{name}' for the model")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"output '{name}': 'parameters' must be an object")
        out = ParsedOutput(name, bool(params.get("binary_data", binary_default)))
        if "classification" in params:
            out.classification = _int_param(params, "classification", f"output '{name}'")
            if out.classification < 1:
                raise ProtocolError(f"output '{name}': parameters.classification must be at least 1")
            if "shared_memory_region" in params:
                raise ProtocolError(
                    f"output '{name}': classification results are not written to shared memory"
                )
        if "shared_memory_region" in params:
            if not shm_enabled:
                raise ProtocolError("system shared memory is disabled (MODEL_SERVER_ALLOW_CLIENT_SHM)", 501)
            out.region = str(params["shared_memory_region"])
            out.region_size = _int_param(params, "shared_memory_byte_size", f"output '{name}'", required=True)
            out.region_offset = _int_param(params, "shared_memory_offset", f"output '{name}'")
        outputs.append(out)
    timeout_s = None
    if "timeout" in parameters:
        timeout_us = parameters["timeout"]
        if not isinstance(timeout_us, int) or timeout_us < 0:
            raise ProtocolError("parameters.timeout must be a non-negative integer (microseconds)")
        timeout_s = timeout_us / 1e6 if timeout_us else None
    request_id = header.get("id")
    return ParsedRequest(
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
        inputs=inputs,
        outputs=outputs,
        binary_default=binary_default,
        timeout_s=timeout_s,
    )


def _int_param(params: dict[str, Any], key: str, where: str, required: bool = False) -> int:
    value = params.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"{where}: parameters.{key} is required")
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: parameters.{key} must be a non-negative integer")
    return value


def output_entry(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def json_data(arr: Array, datatype: str) -> Any:
    """Flat row-major JSON data for one output."""
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if datatype == "FP16":
        return flat.astype(np.float32)
    return flat


def encode_response(head: dict[str, Any], binary_parts: list[memoryview]) -> tuple[bytes, int | None]:
    """The JSON body, or header + binary parts and the header's length when any output is binary.

    The join is the one copy of binary outputs: from shared memory into the response.
    """
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary_parts:
        return header, None
    return b"".join([header, *binary_parts]), len(header)
