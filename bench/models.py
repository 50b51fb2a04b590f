"""The three reference models, built deterministically by the benchmark itself.

- ``tabular``: scikit-learn GradientBoostingClassifier (100 trees of depth 3, 30 float
  features, binary) converted with skl2onnx: input ``float_input`` [N, 30], outputs
  ``label`` (INT64 [N]) and ``probabilities`` (FP32 [N, 2]); ``zipmap=False``;
  ``metadata_props["feature_names"] = "f0,...,f29"`` so the /v1 records path can map
  records to columns.
- ``mlp``: 512 -> 4096 -> 4096 -> 10 (Gemm+Relu, Gemm+Relu, Gemm), input ``x`` [N, 512]:
  compute-bound, where dynamic batching pays (raw onnxruntime, one thread, does several
  times the rows/s at batch 32 than at batch 1).
- ``cnn``: input ``x`` [N, 3, 224, 224] (602,112 bytes a row), three Conv+Relu+MaxPool
  stages, a global average pool and a Gemm to 10 classes, about half a millisecond a
  row on one core of the 2-core reference machine.

Every model is written as this server's local repository (``<id>/1/model.onnx``) and
as MLServer model folders (``model-settings.json`` naming the custom runtime in
:mod:`bench.mlserver_runtime`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto

SEED = 20240605
OPSET = 17
# The MLP is also served under this id with dynamic batching switched on, so one
# server start measures the same model with and without batching.
BATCHED_SUFFIX = "_batched"
MLSERVER_IMPLEMENTATION = "bench.mlserver_runtime.OnnxRuntimeModel"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # Open Inference Protocol name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 marks the batch dimension


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    feature_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.input.shape[1:]

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.row_shape)

    def output_shape(self, output: TensorInfo, batch: int) -> tuple[int, ...]:
        return (batch, *output.shape[1:])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * 4


TABULAR_FEATURES = 30
# Wide enough that one row is a memory-bound matrix-vector product and a batch of 32 is
# compute-bound: raw onnxruntime on one thread does several times the rows/s at batch 32.
MLP_WIDTH = 4096
REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "tabular": ReferenceModel(
        name="tabular",
        description="GradientBoostingClassifier, 100 trees of depth 3, 30 FP32 features (skl2onnx)",
        inputs=(TensorInfo("float_input", "FP32", (-1, TABULAR_FEATURES)),),
        outputs=(TensorInfo("label", "INT64", (-1,)), TensorInfo("probabilities", "FP32", (-1, 2))),
        feature_names=tuple(f"f{i}" for i in range(TABULAR_FEATURES)),
    ),
    "mlp": ReferenceModel(
        name="mlp",
        description=f"MLP 512 -> {MLP_WIDTH} -> {MLP_WIDTH} -> 10, ReLU, FP32, compute-bound (72 MB)",
        inputs=(TensorInfo("x", "FP32", (-1, 512)),),
        outputs=(TensorInfo("y", "FP32", (-1, 10)),),
    ),
    "cnn": ReferenceModel(
        name="cnn",
        description="small CNN, [N,3,224,224] FP32 (588 KiB a row), 3x Conv+ReLU+MaxPool, GAP, Gemm to 10",
        inputs=(TensorInfo("x", "FP32", (-1, 3, 224, 224)),),
        outputs=(TensorInfo("y", "FP32", (-1, 10)),),
    ),
}


def sample_input(model: ReferenceModel, batch: int, seed: int = SEED) -> np.ndarray:
    """The request rows every peer receives: seeded, rounded to 4 decimals so the JSON
    bodies of all peers are byte-identical and of a realistic size."""
    rng = np.random.default_rng(seed + 1)
    data = rng.standard_normal(model.input_shape(batch)).astype(np.float32)
    return np.round(data, 4)


# --- builders -------------------------------------------------------------------------


def _build_tabular(path: Path, seed: int) -> None:
    from onnx import StringStringEntryProto
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import make_classification
    from sklearn.ensemble import GradientBoostingClassifier

    spec = REFERENCE_MODELS["tabular"]
    features, labels = make_classification(
        n_samples=4000, n_features=TABULAR_FEATURES, n_informative=12, random_state=seed
    )
    clf = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=seed)
    clf.fit(features.astype(np.float32), labels)
    onx = to_onnx(
        clf,
        initial_types=[("float_input", FloatTensorType([None, TABULAR_FEATURES]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    onx.metadata_props.append(StringStringEntryProto(key="feature_names", value=",".join(spec.feature_names)))
    _save(onx, path)


def _build_mlp(path: Path, seed: int) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed + 2)
    sizes = [512, MLP_WIDTH, MLP_WIDTH, 10]
    nodes = []
    inits = []
    current = "x"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = np.zeros(fan_out, dtype=np.float32)
        inits += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        last = layer == len(sizes) - 2
        out = "y" if last else f"h{layer}"
        gemm_out = out if last else f"g{layer}"
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    _save(_model(graph), path)


def _build_cnn(path: Path, seed: int) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed + 3)
    # (out_channels, kernel, stride) per stage; each stage is Conv+Relu+MaxPool(2).
    stages = [(8, 3, 2), (16, 3, 1), (32, 3, 1)]
    nodes = []
    inits = []
    current, channels = "x", 3
    for i, (out_ch, kernel, stride) in enumerate(stages):
        fan_in = channels * kernel * kernel
        weight = (rng.standard_normal((out_ch, channels, kernel, kernel)) * np.sqrt(2.0 / fan_in)).astype(
            np.float32
        )
        inits += [
            numpy_helper.from_array(weight, f"conv{i}_w"),
            numpy_helper.from_array(np.zeros(out_ch, dtype=np.float32), f"conv{i}_b"),
        ]
        pad = kernel // 2
        nodes += [
            helper.make_node(
                "Conv",
                [current, f"conv{i}_w", f"conv{i}_b"],
                [f"c{i}"],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        current, channels = f"p{i}", out_ch
    fc_w = (rng.standard_normal((channels, 10)) * np.sqrt(2.0 / channels)).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(np.zeros(10, dtype=np.float32), "fc_b"),
        numpy_helper.from_array(np.array([-1, channels], dtype=np.int64), "flat_shape"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["gap"]),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    _save(_model(graph), path)


def _model(graph: GraphProto) -> ModelProto:
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "model-server-bench"
    return model


def _save(model: ModelProto, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


BUILDERS = {"tabular": _build_tabular, "mlp": _build_mlp, "cnn": _build_cnn}


def build_models(out_dir: Path, names: list[str], seed: int = SEED) -> dict[str, Path]:
    """Build the named reference models into ``out_dir/<name>.onnx``."""
    paths: dict[str, Path] = {}
    for name in names:
        path = out_dir / f"{name}.onnx"
        BUILDERS[name](path, seed)
        paths[name] = path
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_ids(name: str) -> list[str]:
    """Model ids one reference model is served under (the MLP twice: plain and batched)."""
    return [name, name + BATCHED_SUFFIX] if name == "mlp" else [name]


def layout_repository(paths: dict[str, Path], repo_dir: Path) -> Path:
    """This server's local repository: ``<repo_dir>/<model_id>/1/model.onnx``."""
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    for name, path in paths.items():
        for model_id in served_ids(name):
            target = repo_dir / model_id / "1" / "model.onnx"
            target.parent.mkdir(parents=True)
            shutil.copyfile(path, target)
    return repo_dir


def layout_mlserver(paths: dict[str, Path], models_dir: Path) -> Path:
    """MLServer model folders: ``<models_dir>/<name>/{model-settings.json, model.onnx}``."""
    if models_dir.exists():
        shutil.rmtree(models_dir)
    for name, path in paths.items():
        folder = models_dir / name
        folder.mkdir(parents=True)
        shutil.copyfile(path, folder / "model.onnx")
        settings = {
            "name": name,
            "implementation": MLSERVER_IMPLEMENTATION,
            "parameters": {"uri": "./model.onnx", "version": "1"},
        }
        (folder / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return models_dir
