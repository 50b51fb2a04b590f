"""Models the tests build themselves (onnx.helper, scikit-learn + skl2onnx) and the reference runner.

Every inference test compares the server's answer with ``ort_run`` on the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def ort_run(path: Path, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    """The reference: ONNX Runtime in the test process, CPU provider."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def linear(path: Path, features: int = 3, seed: int = 0) -> Path:
    """y = x @ W + b, sigmoid score and argmax label; one [N, F] input with feature_names metadata."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(features, 2)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    helper.set_model_props(model, {"feature_names": ",".join(f"f{i}" for i in range(features))})
    return save(model, path)


def slow(path: Path, width: int = 1024, layers: int = 200) -> Path:
    """A chain of width x width MatMuls (identity weights): seconds of CPU for a few hundred rows."""
    eye = numpy_helper.from_array(np.eye(width, dtype=np.float32), "eye")
    nodes = []
    prev = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "eye"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[eye],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)


def expand(path: Path) -> Path:
    """Output shape chosen by an input: the server cannot size it in advance (spill path)."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)


def multi_dtype(path: Path) -> Path:
    """Several inputs of several types: int64 count + float amount + string tag + bool flag."""
    nodes = [
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["amount"], ["amount_d"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["count_f", "amount_d"], ["total"]),
        helper.make_node("Not", ["flag"], ["not_flag"]),
        helper.make_node("Identity", ["tag"], ["tag_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "multi",
        [
            helper.make_tensor_value_info("count", TensorProto.INT64, ["N", 1]),
            helper.make_tensor_value_info("amount", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, ["N", 1]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.DOUBLE, ["N", 1]),
            helper.make_tensor_value_info("not_flag", TensorProto.BOOL, ["N", 1]),
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["N", 1]),
        ],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)


def sklearn_classifier(path: Path, features: list[str], seed: int = 0, zipmap: bool = False) -> Path:
    """A scikit-learn LogisticRegression on named tabular features, through skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, len(features))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, -1] > 0).astype(np.int64)
    clf = LogisticRegression().fit(x, y)
    model = to_onnx(clf, x[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)
    helper.set_model_props(model, {"feature_names": ",".join(features)})
    return save(model, path)


def identity_types(path: Path) -> Path:
    """One Identity per datatype: INT8, UINT8, INT16, UINT16, INT32, UINT32, UINT64, FP16, FP64, BOOL."""
    types = {
        "i8": TensorProto.INT8,
        "u8": TensorProto.UINT8,
        "i16": TensorProto.INT16,
        "u16": TensorProto.UINT16,
        "i32": TensorProto.INT32,
        "u32": TensorProto.UINT32,
        "u64": TensorProto.UINT64,
        "f16": TensorProto.FLOAT16,
        "f64": TensorProto.DOUBLE,
        "b": TensorProto.BOOL,
    }
    nodes = [helper.make_node("Identity", [f"in_{k}"], [f"out_{k}"]) for k in types]
    graph = helper.make_graph(
        nodes,
        "types",
        [helper.make_tensor_value_info(f"in_{k}", t, ["N", 2, 3]) for k, t in types.items()],
        [helper.make_tensor_value_info(f"out_{k}", t, ["N", 2, 3]) for k, t in types.items()],
    )
    return save(helper.make_model(graph, opset_imports=OPSET), path)


def multi_feeds() -> dict[str, Any]:
    """Inputs of the ``multi`` model: INT64, FP32, BOOL and BYTES (one empty, one non-ASCII)."""
    return {
        "count": np.array([[2], [5], [-1]], dtype=np.int64),
        "amount": np.array([[1.5], [0.5], [4.0]], dtype=np.float32),
        "flag": np.array([[True], [False], [True]]),
        "tag": np.array([[b"a"], [b""], ["ünï".encode()]], dtype=object),
    }


def datatype_arrays(seed: int = 5) -> dict[str, Any]:
    """One [3, 2, 3] array of every other datatype the ``types`` model echoes (key: its suffix)."""
    rng = np.random.default_rng(seed)
    return {
        "i8": rng.integers(-128, 127, size=(3, 2, 3)).astype(np.int8),
        "u8": rng.integers(0, 255, size=(3, 2, 3)).astype(np.uint8),
        "i16": rng.integers(-30000, 30000, size=(3, 2, 3)).astype(np.int16),
        "u16": rng.integers(0, 65000, size=(3, 2, 3)).astype(np.uint16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(3, 2, 3)).astype(np.int32),
        "u32": rng.integers(0, 2**32 - 1, size=(3, 2, 3)).astype(np.uint32),
        "u64": rng.integers(0, 2**63, size=(3, 2, 3)).astype(np.uint64),
        "f16": rng.normal(size=(3, 2, 3)).astype(np.float16),
        "f64": rng.normal(size=(3, 2, 3)),
        "b": rng.integers(0, 2, size=(3, 2, 3)).astype(bool),
    }
