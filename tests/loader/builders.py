"""Models built in the tests, and the onnxruntime reference they are compared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FEATURES = ["age", "income", "score"]


@dataclass
class BuiltModel:
    """An ONNX model, its serialized bytes (the reference) and an input batch."""

    proto: onnx.ModelProto
    reference: bytes  # serialized before MLflow moves weights to external data
    feed: dict[str, np.ndarray[Any, Any]]


def sklearn_model(seed: int) -> BuiltModel:
    """LogisticRegression on named tabular features, converted by skl2onnx (no ZipMap)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, len(FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 2] + rng.normal(scale=0.1, size=64) > 0).astype(np.int64)
    clf = LogisticRegression().fit(x, y)
    proto = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17)
    return BuiltModel(proto, proto.SerializeToString(), {proto.graph.input[0].name: x[:8]})


def dense_model(width: int = 64, seed: int = 0) -> BuiltModel:
    """y = relu(x @ W + b) with a width x width weight: big enough for ONNX external data."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(width,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[w, b],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    feed = {"x": rng.normal(size=(4, width)).astype(np.float32)}
    return BuiltModel(proto, proto.SerializeToString(), feed)


def run(model: bytes | Path | str, feed: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    return list(session.run(None, feed))


def assert_same_outputs(path: Path, built: BuiltModel) -> None:
    """onnxruntime on the loaded file gives what it gives on the model as built."""
    got = run(path, built.feed)
    want = run(built.reference, built.feed)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
