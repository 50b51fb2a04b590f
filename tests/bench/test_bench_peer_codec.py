"""The V2 JSON codec LitServe's API runs: the same wrk bodies in, V2 JSON out (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.models import REFERENCE_MODELS, build_models, sample_input
from bench.ort_options import session_options
from bench.payloads import v2_json_body
from bench.v2_peer_codec import decode_inputs, encode_outputs


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"), ["tabular"])["tabular"]


def test_wrk_body_decodes_to_the_sample_rows() -> None:
    spec = REFERENCE_MODELS["tabular"]
    rows = sample_input(spec, 3)
    feeds = decode_inputs(json.loads(v2_json_body(spec, rows)))
    assert list(feeds) == ["float_input"]
    assert feeds["float_input"].dtype == np.float32 and feeds["float_input"].shape == (3, 30)
    np.testing.assert_array_equal(feeds["float_input"], rows)  # 4-decimal values survive JSON exactly


def test_decode_then_onnxruntime_then_encode_matches_onnxruntime(tabular: Path) -> None:
    spec = REFERENCE_MODELS["tabular"]
    rows = sample_input(spec, 2)
    session = ort.InferenceSession(str(tabular), session_options(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    expected = session.run(names, {"float_input": rows})
    got = session.run(names, decode_inputs(json.loads(v2_json_body(spec, rows))))
    response = json.loads(json.dumps(encode_outputs("tabular", names, got)))
    assert response["model_name"] == "tabular"
    by_name = {out["name"]: out for out in response["outputs"]}
    assert by_name["label"]["datatype"] == "INT64" and by_name["label"]["shape"] == [2]
    assert by_name["probabilities"]["datatype"] == "FP32" and by_name["probabilities"]["shape"] == [2, 2]
    np.testing.assert_array_equal(np.asarray(by_name["label"]["data"]), expected[0])
    np.testing.assert_allclose(
        np.asarray(by_name["probabilities"]["data"], dtype=np.float32).reshape(2, 2), expected[1], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "non-empty 'inputs'"),
        ({"inputs": []}, "non-empty 'inputs'"),
        ({"inputs": ["x"]}, "must be an object"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BF99", "data": [1]}]}, "unsupported datatype"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}, "reshape"),
    ],
)
def test_bad_bodies_are_value_errors(body: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_inputs(body)
