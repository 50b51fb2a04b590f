"""MLflow model directories: the ``MLmodel`` file, its flavors and its signature.

Only the ``onnx`` flavor (``mlflow.onnx.log_model``) can be served; any other
model is refused with a 422 that names the flavors it has and the ones we
support. A column-based signature (``infer_signature`` on a DataFrame) defines
the record schema used by ``/v1/infer``: its column names in order and their
types as Open Inference Protocol datatypes. Tensor-based signatures describe the
model's tensors, which the ONNX graph already gives, so they add nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import InvalidModel

log = logging.getLogger(__name__)

MLMODEL = "MLmodel"
SUPPORTED_FLAVORS = ("onnx",)
# Files of an MLflow model directory that the server never needs.
SIDE_FILES = frozenset(
    {
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
        "input_example.json",
        "serving_input_example.json",
        "registered_model_meta",
    }
)
# MLflow column types (mlflow.types.DataType) -> OIP datatypes.
MLFLOW_TO_OIP = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
}


@dataclass(frozen=True)
class MLmodelInfo:
    flavors: tuple[str, ...]
    model_file: str  # the onnx flavor's ``data``: path of the ONNX file inside the directory
    feature_names: list[str] | None = None
    feature_types: dict[str, str] = field(default_factory=dict)


def safe_relpath(name: str, where: str) -> str:
    """A relative POSIX path that stays inside its directory (no '..', not absolute)."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if not name or norm.startswith(("/", "../")) or norm in {".", ".."}:
        raise InvalidModel(f"{where}: file reference {name!r} leaves the model directory")
    return norm


def _signature_columns(signature: Any, where: str) -> tuple[list[str] | None, dict[str, str]]:
    if not isinstance(signature, dict) or not signature.get("inputs"):
        return None, {}
    raw = signature["inputs"]
    try:
        inputs = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        log.warning("%s: unreadable signature inputs; no record schema", where)
        return None, {}
    if not isinstance(inputs, list) or not inputs:
        return None, {}
    if any(not isinstance(col, dict) or col.get("type") == "tensor" for col in inputs):
        return None, {}  # tensor-based signature: the ONNX graph already describes the tensors
    names: list[str] = []
    types: dict[str, str] = {}
    for col in inputs:
        name, kind = col.get("name"), col.get("type")
        datatype = MLFLOW_TO_OIP.get(str(kind))
        if not isinstance(name, str) or not name or datatype is None:
            log.warning(
                "%s: signature column %r has type %r, which has no tensor datatype; no record schema",
                where,
                name,
                kind,
            )
            return None, {}
        names.append(name)
        types[name] = datatype
    return names, types


def parse_mlmodel(text: bytes | str, where: str) -> MLmodelInfo:
    """Read an ``MLmodel`` file; InvalidModel unless it has the onnx flavor."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidModel(f"{where}: MLmodel is not valid YAML ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise InvalidModel(f"{where}: MLmodel has no 'flavors' section")
    flavors = tuple(str(name) for name in doc["flavors"])
    onnx_conf = doc["flavors"].get("onnx")
    if onnx_conf is None:
        raise InvalidModel(
            f"{where}: unsupported MLflow model flavor(s) {', '.join(flavors) or 'none'}; "
            f"supported: {', '.join(SUPPORTED_FLAVORS)} (log the model with mlflow.onnx.log_model)"
        )
    data = onnx_conf.get("data", "model.onnx") if isinstance(onnx_conf, dict) else "model.onnx"
    model_file = safe_relpath(str(data), where)
    names, types = _signature_columns(doc.get("signature"), where)
    return MLmodelInfo(flavors=flavors, model_file=model_file, feature_names=names, feature_types=types)
