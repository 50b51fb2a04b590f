"""The seed's ``/v1/infer`` payloads, checked against a model's schema and turned into arrays.

Two input forms:

* **records**: a list of objects, one per row, feature name -> value. They map
  onto the model either one input per feature (inputs named like the
  features, shaped ``[N]`` or ``[N, 1]``), or onto one ``[N, F]`` input whose
  column order comes from the model's ``feature_names`` metadata (ONNX
  ``metadata_props`` or an MLflow signature).
* **named tensors**: an object, input name -> nested lists.

Every mismatch is a ``PayloadError`` (HTTP 422) that names the feature, the row
and what was expected. Outputs go back as one record per input row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ipc import datatypes
from ipc.messages import ModelSchema, TensorSpec

Array = npt.NDArray[Any]
JSON_OUTPUTS_KEY = "json_outputs"


class PayloadError(ValueError):
    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


def _kind_ok(value: Any, datatype: str) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if isinstance(value, bool):
        return True
    if datatype.startswith(("INT", "UINT")):
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)


def coerce(values: Any, datatype: str, what: str) -> Array:
    """Array of ``datatype`` from JSON values; strings for numbers (and the reverse) are rejected."""
    if datatype == "BYTES":
        arr = np.array(values, dtype=object)
        flat = arr.reshape(-1)
        for i, value in enumerate(flat):
            if not isinstance(value, str | bytes):
                raise PayloadError(f"{what}: element {i} is {type(value).__name__}, expected a string")
        return arr
    dtype = datatypes.numpy_dtype(datatype)
    try:
        probe = np.asarray(values)
    except ValueError as exc:
        raise PayloadError(f"{what}: ragged or malformed nested lists ({exc})") from None
    if probe.dtype.kind not in "biuf":
        raise PayloadError(f"{what}: {_first_bad(values, datatype)}, expected {datatype} numbers")
    if datatype == "BOOL":
        # true/false, or 0/1: any other number is a mistake, not a truth value.
        if probe.dtype.kind != "b" and probe.size and not np.all((probe == 0) | (probe == 1)):
            raise PayloadError(f"{what}: {_first_bad(values, datatype)}, expected true/false or 0/1")
        return probe.astype(dtype, copy=False)
    if dtype.kind in "iu" and probe.size:
        if probe.dtype.kind == "f" and not (np.all(np.isfinite(probe)) and np.all(probe == np.floor(probe))):
            raise PayloadError(f"{what}: non-integer value for {datatype}")
        info = np.iinfo(dtype.type)  # type: ignore[type-var]
        # Checked on the values as parsed (ints or integral floats alike), before any cast wraps them.
        if probe.min() < info.min or probe.max() > info.max:
            raise PayloadError(f"{what}: value out of range for {datatype} [{info.min}, {info.max}]")
    return probe.astype(dtype, copy=False)


def _flat(values: Any) -> list[Any]:
    if not isinstance(values, list):
        return [values]
    out: list[Any] = []
    for value in values:
        out.extend(_flat(value) if isinstance(value, list) else [value])
    return out


def _first_bad(values: Any, datatype: str) -> str:
    """The first offending element, looked up in the JSON values (not a numpy conversion of them)."""
    for i, value in enumerate(_flat(values)):
        if not _kind_ok(value, datatype):
            return f"element {i} is {type(value).__name__} {value!r}"
    return "values are not all of one numeric kind"


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], what: str) -> None:
    if len(spec.shape) != len(shape):
        raise PayloadError(
            f"{what}: shape {list(shape)} has rank {len(shape)}, the model expects {spec.shape}",
            {"expected_shape": spec.shape, "shape": list(shape)},
        )
    for want, got in zip(spec.shape, shape, strict=True):
        if want >= 0 and want != got:
            raise PayloadError(
                f"{what}: shape {list(shape)} does not match the model's {spec.shape}",
                {"expected_shape": spec.shape, "shape": list(shape)},
            )


def _zero_rows(spec: TensorSpec, trailing_unknown: int = 1) -> Array:
    """An empty batch of ``spec``: zero rows are valid and answer zero rows, as in ONNX Runtime."""
    if not spec.shape or spec.shape[0] >= 0:
        raise PayloadError(f"input {spec.name!r} has no variable batch dimension: send at least one row")
    trailing = [d if d >= 0 else trailing_unknown for d in spec.shape[1:]]
    if spec.datatype == "BYTES":
        return np.empty((0, *trailing), dtype=object)
    return np.empty((0, *trailing), dtype=datatypes.numpy_dtype(spec.datatype))


def records_to_tensors(records: list[Any], schema: ModelSchema) -> dict[str, Array]:
    if not records:
        # No records: a zero-row batch of every input (columns of a [N, F] input from feature_names).
        width = len(schema.feature_names or ()) or 1
        unknown = width if len(schema.inputs) == 1 and len(schema.inputs[0].shape) == 2 else 1
        return {spec.name: _zero_rows(spec, unknown) for spec in schema.inputs}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise PayloadError(f"inputs[{i}] is {type(record).__name__}, expected an object of features")
    inputs = schema.inputs
    names = {spec.name for spec in inputs}
    keys = set(records[0])
    per_feature = keys == names or (len(inputs) > 1 and not schema.feature_names)
    if per_feature or not (len(inputs) == 1 and len(inputs[0].shape) == 2):
        return _per_feature(records, inputs)
    return _matrix(records, inputs[0], schema)


def _row_keys_check(records: list[dict[str, Any]], expected: list[str]) -> None:
    want = set(expected)
    for i, record in enumerate(records):
        got = set(record)
        if got != want:
            missing = sorted(want - got)
            extra = sorted(got - want)
            parts = []
            if missing:
                parts.append(f"missing feature(s) {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected feature(s) {', '.join(extra)}")
            raise PayloadError(
                f"inputs[{i}]: {'; '.join(parts)}",
                {"row": i, "missing": missing, "unexpected": extra, "expected": expected},
            )


def _per_feature(records: list[dict[str, Any]], inputs: list[TensorSpec]) -> dict[str, Array]:
    _row_keys_check(records, [spec.name for spec in inputs])
    tensors: dict[str, Array] = {}
    n = len(records)
    for spec in inputs:
        column = [record[spec.name] for record in records]
        arr = coerce(column, spec.datatype, f"feature {spec.name!r}")
        shape = (n, *arr.shape[1:])
        if len(spec.shape) == 2 and arr.ndim == 1 and spec.shape[1] in (1, -1):
            arr = arr.reshape(n, 1)
        elif len(spec.shape) == len(shape) + 1 and spec.shape[-1] == 1:
            arr = arr.reshape(*shape, 1)
        _check_shape(spec, arr.shape, f"feature {spec.name!r}")
        tensors[spec.name] = arr
    return tensors


def _matrix(records: list[dict[str, Any]], spec: TensorSpec, schema: ModelSchema) -> dict[str, Array]:
    features = schema.feature_names
    if not features:
        raise PayloadError(
            f"model input {spec.name!r} is one [N, F] tensor and the model carries no feature_names "
            "metadata to order record fields: send named tensors instead "
            f'({{"inputs": {{"{spec.name}": [[...], ...]}}}})'
        )
    if spec.shape[1] >= 0 and spec.shape[1] != len(features):
        raise PayloadError(
            f"model metadata lists {len(features)} features but input {spec.name!r} has {spec.shape[1]}"
        )
    _row_keys_check(records, features)
    matrix = [[record[name] for name in features] for record in records]
    try:
        return {spec.name: coerce(matrix, spec.datatype, f"input {spec.name!r}")}
    except PayloadError:
        # Say which feature is wrong, not just which element.
        for name in features:
            for i, record in enumerate(records):
                if not _kind_ok(record[name], spec.datatype):
                    value = record[name]
                    raise PayloadError(
                        f"inputs[{i}].{name}: {type(value).__name__} {value!r} is not {spec.datatype}",
                        {"row": i, "feature": name, "expected": spec.datatype},
                    ) from None
        raise


def named_to_tensors(named: dict[str, Any], schema: ModelSchema) -> dict[str, Array]:
    specs = {spec.name: spec for spec in schema.inputs}
    missing = sorted(set(specs) - set(named))
    extra = sorted(set(named) - set(specs))
    if missing or extra:
        raise PayloadError(
            f"inputs do not match the model: missing {missing}, unexpected {extra}",
            {"missing": missing, "unexpected": extra, "expected": sorted(specs)},
        )
    tensors: dict[str, Array] = {}
    for name, spec in specs.items():
        arr = coerce(named[name], spec.datatype, f"input {name!r}")
        if arr.shape == (0,) and len(spec.shape) > 1:
            arr = _zero_rows(spec)  # ``[]``: zero rows of whatever each row's shape is
        _check_shape(spec, arr.shape, f"input {name!r}")
        tensors[name] = arr
    return tensors


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _object_rows(arr: Array) -> Any:
    """Nested lists of str from an object array of bytes/str."""
    if arr.ndim == 0:
        return _scalar(arr.item())
    return [_object_rows(sub) if isinstance(sub, np.ndarray) else _scalar(sub) for sub in arr]


def tensors_to_records(
    outputs: list[tuple[str, Array]], rows: int, schema: ModelSchema | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record per input row; outputs without a row dimension come back whole in the second value."""
    json_outputs = set()
    if schema is not None and schema.metadata.get(JSON_OUTPUTS_KEY):
        json_outputs = set(schema.metadata[JSON_OUTPUTS_KEY].split(","))
    records: list[dict[str, Any]] = [{} for _ in range(rows)]
    whole: dict[str, Any] = {}
    for name, out in outputs:
        arr = out.reshape(rows) if out.ndim == 2 and out.shape[0] == rows and out.shape[1] == 1 else out
        if arr.ndim >= 1 and arr.shape[0] == rows:
            if name in json_outputs:
                values: list[Any] = [orjson.loads(v) for v in arr.reshape(rows)]
            elif arr.dtype == object:
                values = _object_rows(arr)
            else:
                values = arr.tolist()
            for record, value in zip(records, values, strict=True):
                record[name] = value
        else:
            whole[name] = _object_rows(arr) if arr.dtype == object else arr.tolist()
    return records, whole
