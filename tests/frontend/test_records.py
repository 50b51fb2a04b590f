"""Unit tests of frontend.records: /v1 records and named tensors to arrays, outputs back to records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest

from frontend.errors import ApiError as PayloadError
from frontend.records import JSON_OUTPUTS_KEY, named_to_tensors, records_to_tensors, tensors_to_records
from frontend.tensors import from_json
from ipc.messages import ModelSchema, TensorSpec
from loader.inspect import inspect_model
from tests import models
from tests.models import ort_run

FEATURES = ["amount", "age", "score"]


def coerce(values: Any, datatype: str, what: str) -> np.ndarray[Any, Any]:
    """JSON values as the /v1 API reads them (``frontend/tensors.py``)."""
    return from_json(values, datatype, what, lenient=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("records")
    models.multi_dtype(root / "multi.onnx")
    models.linear(root / "linear.onnx", features=3)
    # The linear model again, its columns named like a tabular model's (scikit-learn would cost seconds).
    credit = onnx.load(models.linear(root / "plain.onnx", features=3, seed=4))
    del credit.metadata_props[:]
    onnx.helper.set_model_props(credit, {"feature_names": ",".join(FEATURES)})
    models.save(credit, root / "credit.onnx")
    return root


def _matrix_schema(
    features: list[str] | None = FEATURES, width: int = 3, datatype: str = "FP32"
) -> ModelSchema:
    return ModelSchema(
        inputs=[TensorSpec("X", datatype, [-1, width])],
        outputs=[TensorSpec("label", "INT64", [-1])],
        feature_names=features,
        batched=True,
    )


# ----------------------------------------------------------------------------- one input per feature


def test_one_input_per_feature_matches_onnxruntime(model_dir: Path) -> None:
    path = model_dir / "multi.onnx"
    schema = inspect_model(path)
    records = [
        {"count": 3, "amount": 1.5, "flag": True, "tag": "a"},
        {"tag": "naïve ✓", "flag": False, "amount": -2, "count": 0},  # any key order, ints for floats
    ]
    tensors = records_to_tensors(records, schema)
    assert set(tensors) == {"count", "amount", "flag", "tag"}
    assert tensors["count"].dtype == np.int64 and tensors["count"].shape == (2, 1)
    assert tensors["amount"].dtype == np.float32 and tensors["amount"].shape == (2, 1)
    assert tensors["flag"].dtype == np.bool_
    # UTF-8 bytes, as the worker reads every BYTES tensor out of shared memory.
    assert tensors["tag"].dtype == object and tensors["tag"].tolist() == [[b"a"], ["naïve ✓".encode()]]
    out = ort_run(path, tensors)
    np.testing.assert_allclose(out["total"], [[4.5], [0.0]])
    np.testing.assert_array_equal(out["not_flag"], [[False], [True]])


def test_per_feature_one_dimensional_inputs() -> None:
    schema = ModelSchema(
        inputs=[TensorSpec("a", "FP64", [-1]), TensorSpec("b", "INT32", [-1])],
        outputs=[TensorSpec("y", "FP64", [-1])],
    )
    tensors = records_to_tensors([{"a": 1, "b": 2}, {"a": 0.5, "b": -1}], schema)
    assert tensors["a"].shape == (2,) and tensors["a"].dtype == np.float64
    assert tensors["b"].tolist() == [2, -1] and tensors["b"].dtype == np.int32


def test_per_feature_missing_and_extra_features_are_named(model_dir: Path) -> None:
    schema = inspect_model(model_dir / "multi.onnx")
    good = {"count": 1, "amount": 1.0, "flag": True, "tag": "x"}
    with pytest.raises(PayloadError) as info:
        records_to_tensors([good, {"count": 1, "amount": 1.0, "flag": True, "colour": "red"}], schema)
    err = info.value
    assert err.message == "inputs[1]: missing feature(s) tag; unexpected feature(s) colour"
    assert err.details["row"] == 1
    assert err.details["missing"] == ["tag"]
    assert err.details["unexpected"] == ["colour"]


def test_per_feature_wrong_type_names_the_feature(model_dir: Path) -> None:
    schema = inspect_model(model_dir / "multi.onnx")
    rows = [{"count": 1, "amount": "lots", "flag": True, "tag": "x"}]
    with pytest.raises(
        PayloadError, match=r"^feature 'amount': element 0 is .*'lots'.*: FP32 data must be numbers"
    ):
        records_to_tensors(rows, schema)
    rows = [{"count": 1.5, "amount": 1, "flag": True, "tag": "x"}]
    with pytest.raises(PayloadError, match=r"feature 'count': non-integer value for INT64"):
        records_to_tensors(rows, schema)
    rows = [{"count": 1, "amount": 1, "flag": True, "tag": 7}]
    with pytest.raises(PayloadError, match=r"feature 'tag': element 0 is int, expected a string"):
        records_to_tensors(rows, schema)


def test_per_feature_wrong_type_blames_the_right_row(model_dir: Path) -> None:
    schema = inspect_model(model_dir / "multi.onnx")
    rows = [
        {"count": 1, "amount": 1.0, "flag": True, "tag": "x"},
        {"count": 1, "amount": "lots", "flag": True, "tag": "x"},
    ]
    with pytest.raises(PayloadError) as info:
        records_to_tensors(rows, schema)
    assert info.value.message == "feature 'amount': element 1 is str 'lots': FP32 data must be numbers"


def test_per_feature_wrong_shape_names_the_feature() -> None:
    schema = ModelSchema(
        inputs=[TensorSpec("a", "FP32", [-1, 2]), TensorSpec("b", "FP32", [-1, 1])],
        outputs=[TensorSpec("y", "FP32", [-1])],
    )
    tensors = records_to_tensors([{"a": [1, 2], "b": 3}], schema)
    assert tensors["a"].shape == (1, 2) and tensors["b"].shape == (1, 1)
    with pytest.raises(PayloadError) as info:
        records_to_tensors([{"a": [1, 2, 3], "b": 3}], schema)
    assert info.value.message.startswith("feature 'a': shape [1, 3] does not match the model's [-1, 2]")
    assert info.value.details == {"expected_shape": [-1, 2], "shape": [1, 3]}


# ----------------------------------------------------------------------------- one [N, F] input


def test_matrix_columns_follow_feature_names(model_dir: Path) -> None:
    path = model_dir / "credit.onnx"
    schema = inspect_model(path)
    assert schema.feature_names == FEATURES
    (input_name,) = [spec.name for spec in schema.inputs]
    records = [
        {"score": 0.5, "amount": 120.0, "age": 31},
        {"age": 45, "score": -1.25, "amount": 3},
    ]
    tensors = records_to_tensors(records, schema)
    assert list(tensors) == [input_name]
    expected = np.array([[120.0, 31, 0.5], [3, 45, -1.25]], dtype=np.float32)
    np.testing.assert_array_equal(tensors[input_name], expected)
    got = ort_run(path, tensors)
    want = ort_run(path, {input_name: expected})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_matrix_on_the_linear_model(model_dir: Path) -> None:
    path = model_dir / "linear.onnx"
    schema = inspect_model(path)
    tensors = records_to_tensors([{"f2": 3, "f0": 1, "f1": 2}], schema)
    np.testing.assert_array_equal(tensors["x"], [[1, 2, 3]])
    assert tensors["x"].dtype == np.float32
    np.testing.assert_allclose(
        ort_run(path, tensors)["scores"], ort_run(path, {"x": np.array([[1, 2, 3]], np.float32)})["scores"]
    )


def test_matrix_missing_and_extra_features_are_named() -> None:
    with pytest.raises(PayloadError) as info:
        records_to_tensors(
            [{"amount": 1, "age": 2, "score": 3}, {"amount": 1, "score": 3, "tenure": 9}], _matrix_schema()
        )
    assert info.value.message == "inputs[1]: missing feature(s) age; unexpected feature(s) tenure"
    assert info.value.details["expected"] == FEATURES


def test_matrix_wrong_type_names_row_and_feature() -> None:
    rows = [{"amount": 1, "age": 2, "score": 3}, {"amount": 1, "age": "old", "score": 3}]
    with pytest.raises(PayloadError) as info:
        records_to_tensors(rows, _matrix_schema())
    assert info.value.message == "inputs[1].age: str 'old' is not FP32"
    assert info.value.details == {"row": 1, "feature": "age", "expected": "FP32"}
    rows = [{"amount": None, "age": 2, "score": 3}]
    with pytest.raises(PayloadError, match=r"inputs\[0\]\.amount: NoneType None is not FP32"):
        records_to_tensors(rows, _matrix_schema())


def test_matrix_needs_feature_names() -> None:
    with pytest.raises(PayloadError, match=r"carries no feature_names metadata.*send named tensors"):
        records_to_tensors([{"a": 1, "b": 2, "c": 3}], _matrix_schema(features=None))


def test_matrix_metadata_width_mismatch() -> None:
    with pytest.raises(PayloadError, match="model metadata lists 3 features but input 'X' has 4"):
        records_to_tensors([{"amount": 1, "age": 2, "score": 3}], _matrix_schema(width=4))


@pytest.mark.parametrize(
    ("records", "fragment"),
    [([{"amount": 1}, [1, 2]], "inputs[1] is list, expected an object")],
)
def test_malformed_record_lists(records: list[Any], fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        records_to_tensors(records, _matrix_schema())
    assert fragment in info.value.message


@pytest.mark.parametrize("model", ["multi.onnx", "linear.onnx", "credit.onnx"])
def test_no_records_and_empty_named_tensors_are_zero_rows_onnxruntime_runs(
    model_dir: Path, model: str
) -> None:
    """Zero rows are a valid batch: the tensors built run in onnxruntime and answer zero rows."""
    schema = inspect_model(model_dir / model)
    for tensors in (
        records_to_tensors([], schema),
        named_to_tensors({spec.name: [] for spec in schema.inputs}, schema),
    ):
        assert {name: arr.shape[0] for name, arr in tensors.items()} == {s.name: 0 for s in schema.inputs}
        outputs = ort_run(model_dir / model, tensors)
        assert all(out.shape[0] == 0 for out in outputs.values())


def test_no_records_for_a_model_without_a_batch_dimension() -> None:
    schema = ModelSchema(inputs=[TensorSpec("x", "FP32", [2, 3])], outputs=[TensorSpec("y", "FP32", [2])])
    with pytest.raises(PayloadError, match="no variable batch dimension"):
        records_to_tensors([], schema)


# ----------------------------------------------------------------------------- named tensors and JSON values


def test_named_tensors(model_dir: Path) -> None:
    path = model_dir / "linear.onnx"
    schema = inspect_model(path)
    tensors = named_to_tensors({"x": [[1, 2, 3], [4, 5, 6]]}, schema)
    assert tensors["x"].dtype == np.float32 and tensors["x"].shape == (2, 3)
    with pytest.raises(PayloadError) as info:
        named_to_tensors({"y": [[1, 2, 3]]}, schema)
    assert info.value.details == {"missing": ["x"], "unexpected": ["y"], "expected": ["x"]}
    with pytest.raises(PayloadError, match=r"input 'x': shape \[1, 2\] does not match the model's \[-1, 3\]"):
        named_to_tensors({"x": [[1, 2]]}, schema)
    with pytest.raises(PayloadError, match=r"input 'x': shape \[3\] has rank 1, the model expects \[-1, 3\]"):
        named_to_tensors({"x": [1, 2, 3]}, schema)
    with pytest.raises(PayloadError, match="ragged or malformed"):
        named_to_tensors({"x": [[1, 2, 3], [4, 5]]}, schema)


@pytest.mark.parametrize(
    ("values", "datatype", "fragment"),
    [
        ([1, 256], "UINT8", "value out of range for UINT8"),
        ([-1], "UINT32", "value out of range for UINT32"),
        ([1.0, float("nan")], "INT64", "non-integer value for INT64"),
        ([float("inf")], "INT32", "non-integer value for INT32"),
        (["1"], "FP32", "element 0 is str '1': FP32 data must be numbers"),
        ([1, None], "FP64", "element 1 is NoneType None"),
    ],
)
def test_coerce_rejects(values: list[Any], datatype: str, fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        coerce(values, datatype, "input 'v'")
    assert info.value.message.startswith("input 'v': ")
    assert fragment in info.value.message


def test_coerce_accepts() -> None:
    assert coerce([1.0, 2.0], "INT8", "v").tolist() == [1, 2]
    assert coerce([True, False], "BOOL", "v").tolist() == [True, False]
    assert coerce([[1, 2]], "FP16", "v").dtype == np.float16
    assert coerce([["a", "b"]], "BYTES", "v").tolist() == [[b"a", b"b"]]
    assert coerce([0, 1], "BOOL", "v").tolist() == [False, True]  # /v1 reads 0/1 as booleans
    assert coerce([True, 2], "FP32", "v").tolist() == [1.0, 2.0]  # and true/false as numbers


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    ("values", "datatype"), [([3e9], "INT32"), ([1, 2.0, 1e20], "INT64"), ([300.0], "UINT8")]
)
def test_coerce_rejects_out_of_range_floats_for_integers(values: list[Any], datatype: str) -> None:
    with pytest.raises(PayloadError, match="out of range"):
        coerce(values, datatype, "input 'v'")


def test_coerce_rejects_non_boolean_integers_for_bool() -> None:
    with pytest.raises(PayloadError):
        coerce([0, 1, 2], "BOOL", "input 'flag'")


# ----------------------------------------------------------------------------- outputs to records


def test_tensors_to_records_one_record_per_row() -> None:
    outputs: list[tuple[str, np.ndarray[Any, Any]]] = [
        ("label", np.array([1, 0, 1], dtype=np.int64)),
        ("scores", np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)),
        ("prob", np.array([[0.5], [0.25], [1.0]])),  # [N, 1] flattens to a scalar per row
        ("tag", np.array([b"a", "b", b"\xc3\xa9"], dtype=object)),
        ("summary", np.array([1.0, 2.0])),  # no row dimension: comes back whole
    ]
    records, whole = tensors_to_records(outputs, 3, None)
    assert records == [
        {"label": 1, "scores": [pytest.approx(0.1), pytest.approx(0.9)], "prob": 0.5, "tag": "a"},
        {"label": 0, "scores": [pytest.approx(0.8), pytest.approx(0.2)], "prob": 0.25, "tag": "b"},
        {"label": 1, "scores": [pytest.approx(0.3), pytest.approx(0.7)], "prob": 1.0, "tag": "é"},
    ]
    assert whole == {"summary": [1.0, 2.0]}


def test_tensors_to_records_json_outputs() -> None:
    schema = ModelSchema(
        inputs=[],
        outputs=[TensorSpec("probabilities", "BYTES", [-1])],
        metadata={JSON_OUTPUTS_KEY: "probabilities"},
    )
    docs = np.array([orjson.dumps({"0": 0.25, "1": 0.75}), orjson.dumps({"0": 1.0, "1": 0.0})], dtype=object)
    records, whole = tensors_to_records([("probabilities", docs)], 2, schema)
    assert records == [{"probabilities": {"0": 0.25, "1": 0.75}}, {"probabilities": {"0": 1.0, "1": 0.0}}]
    assert whole == {}
