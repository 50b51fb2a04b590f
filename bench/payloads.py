"""Request bodies for each path, written once to files that wrk (and the Python client) send.

Paths:
- ``v2-json``: Open Inference Protocol JSON, flat row-major ``data`` (every peer).
- ``v2-binary``: binary tensor extension: JSON header + raw little-endian bytes, header
  ``Inference-Header-Content-Length``, outputs asked for in binary (this server).
- ``v1-records``: the seed's ``/v1/infer`` body, one ``{feature: value}`` record a row
  (this server, tabular model only: it needs ``feature_names``).
- ``v2-shm``: system shared memory driven by wrk: the input lies in a registered region
  written once before the cell (the client's copy is not in the timing, as wrk's other
  bodies are not rebuilt either); outputs come back in binary (this server).
- ``py-binary`` / ``py-shm``: a Python client process loop (:mod:`bench.pyclient`),
  binary HTTP or system shared memory; not wrk.
- ``grpc``: KServe V2 gRPC ``ModelInfer`` (``raw_input_contents``) driven by h2load, a C
  HTTP/2 load generator, as wrk drives REST (:mod:`bench.h2load`, :mod:`bench.grpc_cell`).
- ``py-grpc``: the same calls from ``tritonclient.grpc`` in Python client processes with
  threads (:mod:`bench.pyclient`); run only when ``--paths`` or ``--only`` names it.
- ``in-process``: raw onnxruntime, no server (:mod:`bench.ort_raw`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import ReferenceModel, sample_input

WRK_PATHS = ("v2-json", "v2-binary", "v1-records", "v2-shm")
PY_PATHS = ("py-binary", "py-shm", "py-grpc")
H2LOAD_PATHS = ("grpc",)
OPT_IN_PATHS = ("py-grpc",)  # not in the default plan or a sweep unless --paths / --only names them
ORT_PATH = "in-process"
ALL_PATHS = (*WRK_PATHS, *H2LOAD_PATHS, *PY_PATHS, ORT_PATH)

BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Payload:
    """One request body on disk and how to send it."""

    path: str
    endpoint: str  # URL path, e.g. /v2/models/tabular/infer
    body_file: Path
    content_type: str
    header_length: int | None  # Inference-Header-Content-Length, binary bodies only
    body_bytes: int


def v2_endpoint(model_id: str) -> str:
    return f"/v2/models/{model_id}/infer"


def json_data(array: np.ndarray) -> list[Any]:
    """Flat row-major values, rounded so the text is short (``0.1234``, not float32 noise)."""
    return list(np.round(array.astype(np.float64).ravel(), 4).tolist())


def v2_json_body(model: ReferenceModel, array: np.ndarray) -> bytes:
    request = {
        "inputs": [
            {
                "name": model.input.name,
                "shape": list(array.shape),
                "datatype": model.input.datatype,
                "data": json_data(array),
            }
        ]
    }
    return json.dumps(request, separators=(",", ":")).encode()


def v2_binary_header(model: ReferenceModel, array: np.ndarray, binary_output: bool = True) -> dict[str, Any]:
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": model.input.name,
                "shape": list(array.shape),
                "datatype": model.input.datatype,
                "parameters": {"binary_data_size": int(array.nbytes)},
            }
        ]
    }
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    return header


def v2_binary_body(model: ReferenceModel, array: np.ndarray) -> tuple[bytes, int]:
    """Binary-extension body and its JSON header length."""
    header = json.dumps(v2_binary_header(model, array), separators=(",", ":")).encode()
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return header + raw, len(header)


def v2_shm_body(model: ReferenceModel, array: np.ndarray, region: str) -> bytes:
    """Input read by the workers from the client's region ``region``; outputs in binary."""
    request = {
        "inputs": [
            {
                "name": model.input.name,
                "shape": list(array.shape),
                "datatype": model.input.datatype,
                "parameters": {"shared_memory_region": region, "shared_memory_byte_size": int(array.nbytes)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    return json.dumps(request, separators=(",", ":")).encode()


def shm_region_name(model_id: str) -> str:
    return f"bench_{model_id}_in"


def v1_records_body(model: ReferenceModel, array: np.ndarray, model_id: str, version: str = "1") -> bytes:
    if not model.feature_names:
        raise ValueError(f"model {model.name!r} has no feature names; /v1 records need them")
    rows = np.round(array.astype(np.float64), 4).tolist()
    records = [dict(zip(model.feature_names, row, strict=True)) for row in rows]
    body = {"model_id": model_id, "model_version": version, "inputs": records}
    return json.dumps(body, separators=(",", ":")).encode()


def supports(model: ReferenceModel, path: str) -> bool:
    return path != "v1-records" or bool(model.feature_names)


def write_payload(
    model: ReferenceModel, model_id: str, path: str, batch: int, out_dir: Path, version: str = "1"
) -> Payload:
    """Write the body of (model, path, batch) to ``out_dir`` and describe it."""
    array = sample_input(model, batch)
    header_length: int | None = None
    content_type = JSON_CONTENT_TYPE
    endpoint = v2_endpoint(model_id)
    if path == "v2-json":
        body = v2_json_body(model, array)
    elif path == "v2-binary":
        body, header_length = v2_binary_body(model, array)
        content_type = BINARY_CONTENT_TYPE
    elif path == "v1-records":
        body = v1_records_body(model, array, model_id, version)
        endpoint = "/v1/infer"
    elif path == "v2-shm":
        body = v2_shm_body(model, array, shm_region_name(model_id))
    else:
        raise ValueError(f"no wrk body for path {path!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    body_file = out_dir / f"{model_id}-{path}-b{batch}.body"
    body_file.write_bytes(body)
    return Payload(path, endpoint, body_file, content_type, header_length, len(body))


def check_response(path: str, status: int, headers: dict[str, str], body: bytes) -> str | None:
    """None when a response looks like a successful inference, else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {body[:300].decode(errors='replace')}"
    try:
        length = headers.get(HEADER_LENGTH.lower())
        document = json.loads(body[: int(length)] if length else body)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"response is not JSON: {exc}"
    if path == "v1-records":
        return None if isinstance(document, dict) else "v1 response is not an object"
    outputs = document.get("outputs") if isinstance(document, dict) else None
    if not outputs:
        return f"no outputs in response: {str(document)[:300]}"
    return None
