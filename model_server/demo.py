"""The demo model `make serve` preloads: the seed's ``fraud_detection`` with ``feature1`` and ``feature2``.

A logistic score built with onnx.helper (no training, no download), written
into the local model repository as ``fraud_detection/2.0.0/model.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_ID = "fraud_detection"
VERSION = "2.0.0"


def build() -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.array([[0.8], [-0.5]], dtype=np.float32), "weights")
    bias = numpy_helper.from_array(np.array([-0.2], dtype=np.float32), "bias")
    threshold = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "threshold")
    nodes = [
        helper.make_node("Concat", ["feature1", "feature2"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weights"], ["logit_raw"]),
        helper.make_node("Add", ["logit_raw", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["fraud_probability"]),
        helper.make_node("Greater", ["fraud_probability", "threshold"], ["flag"]),
        helper.make_node("Cast", ["flag"], ["is_fraud"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL_ID,
        [
            helper.make_tensor_value_info("feature1", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("feature2", TensorProto.FLOAT, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info("fraud_probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("is_fraud", TensorProto.INT64, ["N", 1]),
        ],
        initializer=[weights, bias, threshold],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="model-server-demo"
    )
    model.ir_version = 8
    helper.set_model_props(model, {"feature_names": "feature1,feature2", "description": "demo fraud score"})
    onnx.checker.check_model(model)
    return model


def write(repository: Path) -> Path:
    """Write the demo model into ``repository`` unless it is there already."""
    path = Path(repository) / MODEL_ID / VERSION / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(build(), tmp)
        tmp.replace(path)
    return path


def models_file(path: Path) -> Path:
    path.write_text(f'models:\n  - model_id: {MODEL_ID}\n    version: "{VERSION}"\n')
    return path
