"""Verify an ONNX file and read its input/output schema (onnx only, never onnxruntime)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
from onnx import checker

from ipc.datatypes import ONNX_ELEM_TO_OIP
from ipc.messages import ModelSchema, TensorSpec

from .errors import InvalidModel

# metadata_props keys that give the column order of a single [N, F] input.
FEATURE_KEYS = ("feature_names", "features", "columns")
# Outputs that are not tensors (e.g. scikit-learn's ZipMap) travel as BYTES rows of JSON.
JSON_OUTPUTS_KEY = "json_outputs"


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _dims(type_proto: Any) -> list[int]:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return [-1]
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]


def _spec(value_info: Any, json_outputs: list[str]) -> TensorSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        # sequence<map<...>> from classifiers with ZipMap: one JSON document per row.
        json_outputs.append(value_info.name)
        return TensorSpec(value_info.name, "BYTES", [-1])
    elem = value_info.type.tensor_type.elem_type
    datatype = ONNX_ELEM_TO_OIP.get(elem)
    if datatype is None:
        raise InvalidModel(f"tensor {value_info.name!r} has an unsupported element type ({elem})")
    return TensorSpec(value_info.name, datatype, _dims(value_info.type))


def parse_feature_names(raw: str) -> list[str]:
    raw = raw.strip()
    if raw.startswith("["):
        import json

        names = json.loads(raw)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidModel("metadata feature_names must be a JSON list of strings")
        return names
    return [part.strip() for part in raw.split(",") if part.strip()]


def inspect_model(path: Path) -> ModelSchema:
    """Run the ONNX checker and return the model's schema; InvalidModel when it is not ONNX."""
    try:
        checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except checker.ValidationError as exc:
        raise InvalidModel(f"not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # protobuf DecodeError, truncated files, ...
        raise InvalidModel(f"not a valid ONNX model: {type(exc).__name__}: {exc}") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    json_outputs: list[str] = []
    inputs = [_spec(vi, []) for vi in graph.input if vi.name not in initializers]
    outputs = [_spec(vi, json_outputs) for vi in graph.output]
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if json_outputs:
        metadata[JSON_OUTPUTS_KEY] = ",".join(json_outputs)
    feature_names = None
    for key in FEATURE_KEYS:
        if key in metadata:
            feature_names = parse_feature_names(metadata[key])
            break
    batched = all(spec.shape and spec.shape[0] == -1 for spec in inputs + outputs)
    return ModelSchema(
        inputs=inputs,
        outputs=outputs,
        feature_names=feature_names,
        batched=batched,
        metadata=metadata,
    )
