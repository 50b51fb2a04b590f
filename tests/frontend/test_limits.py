"""Request bounds in the V2 codec: checked before any tensor data is converted."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from frontend.v2_codec import ProtocolError, parse_request
from ipc.messages import ModelSchema, TensorSpec

SCHEMA = ModelSchema(
    inputs=[TensorSpec("x", "FP32", [-1, 2]), TensorSpec("fixed", "FP32", [5])],
    outputs=[TensorSpec("y", "FP32", [-1])],
)


def _body(rows: int, fixed: int = 5, extra: int = 0) -> bytes:
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [0.5] * (rows * 2)},
        {"name": "fixed", "datatype": "FP32", "shape": [fixed], "data": [1.0] * fixed},
    ]
    inputs += [{"name": f"e{i}", "datatype": "FP32", "shape": [1], "data": [1.0]} for i in range(extra)]
    return orjson.dumps({"inputs": inputs})


def test_rows_at_the_limit_parse_and_one_more_is_413_naming_the_setting() -> None:
    parsed = parse_request(_body(8), None, SCHEMA, False, max_rows=8, max_inputs=2)
    np.testing.assert_array_equal(parsed.inputs[0].array, np.full((8, 2), 0.5, dtype=np.float32))
    with pytest.raises(ProtocolError) as over:
        parse_request(_body(9), None, SCHEMA, False, max_rows=8, max_inputs=2)
    assert over.value.status == 413
    assert over.value.message == "input 'x': 9 rows exceed MODEL_SERVER_MAX_ROWS_PER_REQUEST=8"


def test_fixed_first_dimension_is_the_models_not_a_batch() -> None:
    """A first dimension the model fixes (an input of 5 values) is not counted as rows."""
    schema = ModelSchema(
        inputs=[TensorSpec("x", "FP32", [-1, 2]), TensorSpec("fixed", "FP32", [5])], outputs=[]
    )
    parsed = parse_request(_body(1), None, schema, False, max_rows=2, max_inputs=2)
    assert [i.shape for i in parsed.inputs] == [[1, 2], [5]]


def test_inputs_over_the_limit_are_413_before_they_are_read() -> None:
    with pytest.raises(ProtocolError) as over:
        parse_request(_body(1, extra=3), None, SCHEMA, False, max_rows=8, max_inputs=4)
    assert over.value.status == 413
    assert over.value.message == "5 inputs exceed MODEL_SERVER_MAX_INPUTS_PER_REQUEST=4"
