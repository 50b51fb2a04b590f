"""Request bounds on a decoded V2 call: checked before any tensor data is converted."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from frontend.call import InferenceCall, check_inputs_against
from frontend.errors import ApiError
from frontend.tensors import from_raw_json
from frontend.v2_codec import decode
from ipc.messages import ModelSchema, TensorSpec
from model_server.settings import Settings

SCHEMA = ModelSchema(
    inputs=[TensorSpec("x", "FP32", [-1, 2]), TensorSpec("fixed", "FP32", [5])],
    outputs=[TensorSpec("y", "FP32", [-1])],
)


def _call(rows: int, fixed: int = 5, extra: int = 0) -> InferenceCall:
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [0.5] * (rows * 2)},
        {"name": "fixed", "datatype": "FP32", "shape": [fixed], "data": [1.0] * fixed},
    ]
    inputs += [{"name": f"e{i}", "datatype": "FP32", "shape": [1], "data": [1.0]} for i in range(extra)]
    call = InferenceCall("m", None, [])
    decode(orjson.dumps({"inputs": inputs}), None, call, shm_enabled=False)
    return call


def _settings(rows: int, inputs: int) -> Settings:
    return Settings(max_rows_per_request=rows, max_inputs_per_request=inputs)


def test_rows_at_the_limit_pass_and_one_more_is_413_naming_the_setting() -> None:
    call = _call(8)
    check_inputs_against(call, SCHEMA, _settings(8, 2))
    x = call.inputs[0]
    assert x.json is not None and x.array is None  # still JSON text: not converted by the checks
    np.testing.assert_array_equal(
        from_raw_json(x.json, "FP32", x.shape, "x"), np.full((8, 2), 0.5, np.float32)
    )
    with pytest.raises(ApiError) as over:
        check_inputs_against(_call(9), SCHEMA, _settings(8, 2))
    assert over.value.status == 413
    assert over.value.message == "input 'x': 9 rows exceeds MODEL_SERVER_MAX_ROWS_PER_REQUEST=8"


def test_fixed_first_dimension_is_the_models_not_a_batch() -> None:
    """A first dimension the model fixes (an input of 5 values) is not counted as rows."""
    call = _call(1)
    check_inputs_against(call, SCHEMA, _settings(2, 2))
    assert [i.shape for i in call.inputs] == [[1, 2], [5]]


def test_inputs_over_the_limit_are_413_before_they_are_read() -> None:
    with pytest.raises(ApiError) as over:
        check_inputs_against(_call(1, extra=3), SCHEMA, _settings(8, 4))
    assert over.value.status == 413
    assert over.value.message == "5 inputs exceeds MODEL_SERVER_MAX_INPUTS_PER_REQUEST=4"
