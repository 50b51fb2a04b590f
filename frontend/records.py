"""The seed's ``/v1/infer`` payloads, checked against a model's schema and turned into arrays.

Two input forms:

* **records**: a list of objects, one per row, feature name -> value. They map
  onto the model either one input per feature (inputs named like the
  features, shaped ``[N]`` or ``[N, 1]``), or onto one ``[N, F]`` input whose
  column order comes from the model's ``feature_names`` metadata (ONNX
  ``metadata_props`` or an MLflow signature).
* **named tensors**: an object, input name -> nested lists.

Every mismatch is an ``ApiError`` 422 that names the feature, the row
and what was expected. Outputs go back as one record per input row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ipc import datatypes
from ipc.messages import ModelSchema, TensorSpec
from model_server.settings import Settings

from .errors import ApiError
from .limits import check_inputs, check_rows
from .tensors import check_shape, from_json, invalid, kind_ok

Array = npt.NDArray[Any]
JSON_OUTPUTS_KEY = "json_outputs"


def to_tensors(settings: Settings, inputs: Any, schema: ModelSchema) -> tuple[dict[str, Array], int]:
    """The model's inputs from records or named tensors, and the number of rows.

    Rows and inputs are bounded before the values are converted (records are copied column by column).
    """
    if isinstance(inputs, list):
        check_rows(settings, len(inputs), "inputs")
        if inputs and isinstance(inputs[0], dict):
            check_inputs(settings, len(inputs[0]), "features in inputs[0]")
        return records_to_tensors(inputs, schema), len(inputs)
    if isinstance(inputs, dict):
        check_inputs(settings, len(inputs), "named input tensors")
        for spec in schema.inputs:
            value = inputs.get(spec.name)
            if spec.shape and spec.shape[0] < 0 and isinstance(value, list):
                check_rows(settings, len(value), f"input {spec.name!r}")
        arrays = named_to_tensors(inputs, schema)
        first = next(iter(arrays.values()))
        return arrays, first.shape[0] if first.ndim else 1
    raise invalid("inputs: expected a list of records or an object of named tensors")


def _zero_rows(spec: TensorSpec, trailing_unknown: int = 1) -> Array:
    """An empty batch of ``spec``: zero rows are valid and answer zero rows, as in ONNX Runtime."""
    if not spec.shape or spec.shape[0] >= 0:
        raise invalid(f"input {spec.name!r} has no variable batch dimension: send at least one row")
    trailing = [d if d >= 0 else trailing_unknown for d in spec.shape[1:]]
    return np.empty((0, *trailing), dtype=datatypes.numpy_dtype(spec.datatype))  # BYTES: object


def records_to_tensors(records: list[Any], schema: ModelSchema) -> dict[str, Array]:
    inputs = schema.inputs
    one_matrix = len(inputs) == 1 and len(inputs[0].shape) == 2  # [N, F], columns from feature_names
    if not records:
        # No records: a zero-row batch of every input.
        width = len(schema.feature_names or ()) or 1
        return {spec.name: _zero_rows(spec, width if one_matrix else 1) for spec in inputs}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise invalid(f"inputs[{i}] is {type(record).__name__}, expected an object of features")
    # Records fill the one [N, F] input unless they name it.
    if one_matrix and set(records[0]) != {inputs[0].name}:
        return _matrix(records, inputs[0], schema)
    return _per_feature(records, inputs)


def _row_keys_check(records: list[dict[str, Any]], expected: list[str]) -> None:
    want = set(expected)
    for i, record in enumerate(records):
        if record.keys() == want:
            continue
        problems = {"missing": sorted(want - record.keys()), "unexpected": sorted(record.keys() - want)}
        parts = [f"{kind} feature(s) {', '.join(names)}" for kind, names in problems.items() if names]
        raise invalid(f"inputs[{i}]: {'; '.join(parts)}", {"row": i, **problems, "expected": expected})


def _per_feature(records: list[dict[str, Any]], inputs: list[TensorSpec]) -> dict[str, Array]:
    _row_keys_check(records, [spec.name for spec in inputs])
    tensors: dict[str, Array] = {}
    for spec in inputs:
        column = [record[spec.name] for record in records]
        arr = from_json(column, spec.datatype, f"feature {spec.name!r}", lenient=True)
        # A value per row fills an [N, 1] (or [N, -1]) input; any trailing dimension of 1 likewise.
        trailing = (1, -1) if arr.ndim == 1 else (1,)
        if len(spec.shape) == arr.ndim + 1 and spec.shape[-1] in trailing:
            arr = arr.reshape(*arr.shape, 1)
        check_shape(spec, list(arr.shape), f"feature {spec.name!r}")
        tensors[spec.name] = arr
    return tensors


def _matrix(records: list[dict[str, Any]], spec: TensorSpec, schema: ModelSchema) -> dict[str, Array]:
    features = schema.feature_names
    if not features:
        raise invalid(
            f"model input {spec.name!r} is one [N, F] tensor and the model carries no feature_names "
            "metadata to order record fields: send named tensors instead "
            f'({{"inputs": {{"{spec.name}": [[...], ...]}}}})'
        )
    if spec.shape[1] >= 0 and spec.shape[1] != len(features):
        raise invalid(
            f"model metadata lists {len(features)} features but input {spec.name!r} has {spec.shape[1]}"
        )
    _row_keys_check(records, features)
    matrix = [[record[name] for name in features] for record in records]
    try:
        return {spec.name: from_json(matrix, spec.datatype, f"input {spec.name!r}", lenient=True)}
    except ApiError:
        # Say which feature is wrong, not just which element.
        for name in features:
            for i, value in enumerate(record[name] for record in records):
                if not kind_ok(value, spec.datatype, lenient=True):
                    raise invalid(
                        f"inputs[{i}].{name}: {type(value).__name__} {value!r} is not {spec.datatype}",
                        {"row": i, "feature": name, "expected": spec.datatype},
                    ) from None
        raise


def named_to_tensors(named: dict[str, Any], schema: ModelSchema) -> dict[str, Array]:
    specs = {spec.name: spec for spec in schema.inputs}
    missing = sorted(set(specs) - set(named))
    extra = sorted(set(named) - set(specs))
    if missing or extra:
        raise invalid(
            f"inputs do not match the model: missing {missing}, unexpected {extra}",
            {"missing": missing, "unexpected": extra, "expected": sorted(specs)},
        )
    tensors: dict[str, Array] = {}
    for name, spec in specs.items():
        arr = from_json(named[name], spec.datatype, f"input {name!r}", lenient=True)
        if arr.shape == (0,) and len(spec.shape) > 1:
            arr = _zero_rows(spec)  # ``[]``: zero rows of whatever each row's shape is
        check_shape(spec, list(arr.shape), f"input {name!r}")
        tensors[name] = arr
    return tensors


# Nested lists of str from an object array of bytes/str.
_text = np.vectorize(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v, otypes=[object])


def _lists(arr: Array) -> Any:
    """An output as nested lists, BYTES as text."""
    return _text(arr).tolist() if arr.dtype == object and arr.size else arr.tolist()


def tensors_to_records(
    outputs: list[tuple[str, Array]], rows: int, schema: ModelSchema | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record per input row; outputs without a row dimension come back whole in the second value."""
    listed = schema.metadata.get(JSON_OUTPUTS_KEY) if schema is not None else None
    json_outputs = set(listed.split(",")) if listed else set()
    records: list[dict[str, Any]] = [{} for _ in range(rows)]
    whole: dict[str, Any] = {}
    for name, out in outputs:
        arr = out.reshape(rows) if out.shape == (rows, 1) else out
        if arr.ndim == 0 or arr.shape[0] != rows:
            whole[name] = _lists(arr)
            continue
        values = [orjson.loads(v) for v in arr.reshape(rows)] if name in json_outputs else _lists(arr)
        for record, value in zip(records, values, strict=True):
            record[name] = value
    return records, whole
