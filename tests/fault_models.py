"""Models whose run fails on some inputs only, for the worker's containment tests.

Each is a valid ONNX model that onnxruntime loads and warms up; the failure
comes from the data of one request, as an attacker's would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.models import OPSET, save

LOOKUP_TABLE = np.array([10.0, 20.0, 30.0, 40.0], dtype=np.float32)


def lookup(path: Path) -> Path:
    """``out[n] = LOOKUP_TABLE[idx[n]]``: an index outside [-4, 3] makes onnxruntime raise.

    Input ``idx`` INT64 ``[N, 1]``, output ``value`` FP32 ``[N, 1]``: batchable, and the
    frontend cannot know which indices are in range, so a bad one reaches the worker.
    """
    table = numpy_helper.from_array(LOOKUP_TABLE, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["value"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 1])],
        initializer=[table],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)


def sequence(path: Path) -> Path:
    """Output ``pair`` is a *sequence* of two tensors: ONNX Runtime returns a Python list of arrays.

    It loads, inspects and warms up like any model, but its output is not a tensor the
    worker can encode: every request makes the worker's encoding raise.
    """
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x", "x"], ["pair"])],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_sequence_value_info("pair", TensorProto.FLOAT, ["N", 1])],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)
