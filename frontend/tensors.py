"""JSON tensor data to numpy and back, for every REST codec (``/v1`` records and named
tensors, V2 JSON), and the shape check against a model's input.

numpy converts nested lists in C (a 150,000-value image in milliseconds); the
element-by-element Python checks run only to explain a failure. Every problem is
an ``ApiError`` 422 naming the tensor (the V2 rendering answers it as 400).

``lenient`` is the ``/v1`` API's reading of JSON: ``true``/``false`` count as numbers
and 0/1 as booleans. The V2 protocol, as Triton reads it, takes neither.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from ipc import datatypes
from ipc.messages import TensorSpec

from .errors import ApiError
from .json_tensors import decode_numeric

Array = npt.NDArray[Any]


def invalid(message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(422, "invalid_input", message, details)


def from_raw_json(
    raw: bytes | memoryview | msgspec.Raw, datatype: str, shape: list[int], where: str
) -> Array:
    """A V2 input's ``data`` (its JSON text, kept raw by the envelope) as an array of ``shape``."""
    raw = memoryview(raw)
    if datatype != "BYTES":
        # Large numeric tensors skip a Python object per element (None: not certain, general path).
        fast = decode_numeric(raw, datatype, shape)
        if fast is not None:
            return fast
    return from_json(orjson.loads(raw), datatype, where, shape)  # msgspec has checked it is JSON


def from_json(
    data: Any, datatype: str, where: str, shape: list[int] | None = None, *, lenient: bool = False
) -> Array:
    """An array of ``datatype`` from nested or flat JSON values; of ``shape`` when given
    (the values fill it row-major), else shaped as the nesting is."""
    if datatype == "BYTES":
        return _strings(data, where, shape)
    dtype = datatypes.numpy_dtype(datatype)
    try:
        probe = np.asarray(data)
    except ValueError as exc:
        if shape is None:
            raise invalid(f"{where}: ragged or malformed nested lists ({exc})") from None
        probe = np.asarray(flatten(data), dtype=object)  # ragged: counted (and rejected) below
    if shape is not None:
        count = math.prod(shape)
        if probe.size != count or (probe.dtype == object and len(flatten(data)) != count):
            raise invalid(
                f"{where}: {len(flatten(data))} values do not fill shape {shape} ({count} elements)"
            )
    _check_kind(probe, data, datatype, where, lenient)
    if dtype.kind in "iu" and probe.size:
        if probe.dtype.kind == "f" and not (np.all(np.isfinite(probe)) and np.all(probe == np.floor(probe))):
            raise invalid(f"{where}: non-integer value for {datatype}")
        info = np.iinfo(dtype.type)  # type: ignore[type-var]
        # Checked on the values as parsed (ints or integral floats alike), before any cast wraps them.
        if probe.min() < info.min or probe.max() > info.max:
            raise invalid(f"{where}: value out of range for {datatype} [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # a float beyond FP16/FP32 is inf, as numpy casts it; not a log line
        array = probe.astype(dtype, copy=False)
    return array.reshape(shape) if shape is not None else array


def _check_kind(probe: Array, data: Any, datatype: str, where: str, lenient: bool) -> None:
    kind = probe.dtype.kind
    if not probe.size:
        return  # [] parses as float64: zero elements of any type are valid
    if datatype == "BOOL":
        if kind == "b" or (lenient and kind in "iuf" and np.all((probe == 0) | (probe == 1))):
            return
        wanted = "true/false or 0/1" if lenient else "true/false"
        raise invalid(f"{where}: {_first_bad(data, datatype, lenient)}: BOOL data must be {wanted}")
    if kind not in ("biuf" if lenient else "iuf"):
        raise invalid(f"{where}: {_first_bad(data, datatype, lenient)}: {datatype} data must be numbers")


def kind_ok(value: Any, datatype: str, lenient: bool) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool) or (lenient and isinstance(value, int) and value in (0, 1))
    if isinstance(value, bool):
        return lenient
    if datatype.startswith(("INT", "UINT")):
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)


def _first_bad(data: Any, datatype: str, lenient: bool) -> str:
    """The first offending element, looked up in the JSON values (not a numpy conversion of them)."""
    for i, value in enumerate(flatten(data)):
        if not kind_ok(value, datatype, lenient):
            return f"element {i} is {type(value).__name__} {value!r}"
    return "values are not all of one numeric kind"


def _strings(data: Any, where: str, shape: list[int] | None) -> Array:
    flat = flatten(data)
    for i, value in enumerate(flat):
        if not isinstance(value, str):
            raise invalid(f"{where}: element {i} is {type(value).__name__}, expected a string")
    if shape is None:
        shape = list(np.shape(np.asarray(data, dtype=object)))
    if len(flat) != math.prod(shape):
        raise invalid(f"{where}: {len(flat)} values do not fill shape {shape} ({math.prod(shape)} elements)")
    array = np.empty(len(flat), dtype=object)
    array[:] = [v.encode("utf-8") for v in flat]
    return array.reshape(shape)


def flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested lists (the protocols allow nested or flat data)."""
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


def check_shape(spec: TensorSpec, shape: list[int], where: str) -> None:
    """``shape`` fits the model's (``-1`` matches any size)."""
    details = {"expected_shape": spec.shape, "shape": shape}
    if len(spec.shape) != len(shape):
        raise invalid(
            f"{where}: shape {shape} has rank {len(shape)}, the model expects {spec.shape}", details
        )
    if any(want >= 0 and want != got for want, got in zip(spec.shape, shape, strict=True)):
        raise invalid(f"{where}: shape {shape} does not match the model's {spec.shape}", details)


def to_json(array: Array, datatype: str) -> Any:
    """Flat row-major JSON data for one output (orjson serializes the numpy array)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if datatype == "FP16":
        return flat.astype(np.float32)
    return flat
