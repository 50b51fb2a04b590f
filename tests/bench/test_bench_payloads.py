from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.models import REFERENCE_MODELS, sample_input
from bench.payloads import check_response, v1_records_body, v2_binary_body, v2_json_body, write_payload


def test_v2_json_body_is_flat_and_short() -> None:
    spec = REFERENCE_MODELS["tabular"]
    array = sample_input(spec, 2)
    doc = json.loads(v2_json_body(spec, array))
    (inp,) = doc["inputs"]
    assert inp == {**inp, "name": "float_input", "shape": [2, 30], "datatype": "FP32"}
    assert len(inp["data"]) == 60
    assert np.allclose(np.array(inp["data"], dtype=np.float32).reshape(2, 30), array)
    assert all(len(repr(v)) <= 8 for v in inp["data"])  # rounded to 4 decimals


def test_v2_binary_body_layout() -> None:
    spec = REFERENCE_MODELS["mlp"]
    array = sample_input(spec, 3)
    body, header_len = v2_binary_body(spec, array)
    header = json.loads(body[:header_len])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 3 * 512 * 4
    assert header["parameters"] == {"binary_data_output": True}
    assert "data" not in header["inputs"][0]
    raw = np.frombuffer(body[header_len:], dtype="<f4").reshape(3, 512)
    assert np.array_equal(raw, array)


def test_v1_records_body() -> None:
    spec = REFERENCE_MODELS["tabular"]
    doc = json.loads(v1_records_body(spec, sample_input(spec, 2), "tabular"))
    assert doc["model_id"] == "tabular" and doc["model_version"] == "1"
    assert len(doc["inputs"]) == 2 and list(doc["inputs"][0]) == [f"f{i}" for i in range(30)]


def test_same_input_for_every_peer() -> None:
    spec = REFERENCE_MODELS["cnn"]
    assert np.array_equal(sample_input(spec, 1), sample_input(spec, 1))
    assert sample_input(spec, 1).nbytes == 602_112


def test_write_payload(tmp_path: Path) -> None:
    payload = write_payload(REFERENCE_MODELS["tabular"], "tabular", "v1-records", 1, tmp_path)
    assert payload.endpoint == "/v1/infer" and payload.header_length is None
    assert payload.body_file.read_bytes()[:1] == b"{"
    binary = write_payload(REFERENCE_MODELS["tabular"], "tabular", "v2-binary", 1, tmp_path)
    assert binary.endpoint == "/v2/models/tabular/infer" and binary.content_type == "application/octet-stream"
    assert binary.body_bytes == binary.header_length + 120  # type: ignore[operator]


def test_check_response() -> None:
    ok = json.dumps({"outputs": [{"name": "y"}]}).encode()
    assert check_response("v2-json", 200, {}, ok) is None
    assert (
        check_response("v2-binary", 200, {"inference-header-content-length": str(len(ok))}, ok + b"\0\0")
        is None
    )
    assert "HTTP 400" in (check_response("v2-json", 400, {}, b'{"error":"bad"}') or "")
    assert "no outputs" in (check_response("v2-json", 200, {}, b"{}") or "")
    assert check_response("v1-records", 200, {}, b'{"predictions":[1]}') is None
