"""MLmodel files, URIs, redaction and error mapping (no services)."""

from __future__ import annotations

import json

import pytest

from loader.errors import InvalidModel, InvalidUri, LoadError
from loader.mlflow_source import parse_models_uri, parse_runs_uri
from loader.mlmodel import parse_mlmodel
from loader.redact import redact, register_secret
from loader.s3_source import parse_s3_uri


def mlmodel(flavors: str, inputs: list[dict[str, object]] | None = None) -> str:
    text = f"flavors:\n{flavors}"
    if inputs is not None:
        text += f"signature:\n  inputs: '{json.dumps(inputs)}'\n  outputs: null\n"
    return text


ONNX_FLAVOR = "  onnx:\n    data: model.onnx\n    onnx_version: 1.17.0\n"


def test_onnx_flavor_with_column_signature() -> None:
    cols: list[dict[str, object]] = [
        {"type": "float", "name": "a", "required": True},
        {"type": "double", "name": "b"},
        {"type": "long", "name": "c"},
        {"type": "integer", "name": "d"},
        {"type": "boolean", "name": "e"},
        {"type": "string", "name": "f"},
        {"type": "binary", "name": "g"},
    ]
    info = parse_mlmodel(mlmodel(ONNX_FLAVOR, cols), "here")
    assert info.model_file == "model.onnx"
    assert info.feature_names == list("abcdefg")
    assert info.feature_types == {
        "a": "FP32", "b": "FP64", "c": "INT64", "d": "INT32", "e": "BOOL", "f": "BYTES", "g": "BYTES"
    }  # fmt: skip


@pytest.mark.parametrize(
    "inputs",
    [
        None,
        [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}],
        [{"type": "datetime", "name": "when"}, {"type": "float", "name": "x"}],
        [{"type": "float"}],
    ],
)
def test_no_record_schema_without_typed_named_columns(inputs: list[dict[str, object]] | None) -> None:
    info = parse_mlmodel(mlmodel(ONNX_FLAVOR, inputs), "here")
    assert info.feature_names is None and info.feature_types == {}


def test_other_flavors_are_refused_naming_the_supported_one() -> None:
    flavors = (
        "  sklearn:\n    pickled_model: model.pkl\n  python_function:\n    loader_module: mlflow.sklearn\n"
    )
    with pytest.raises(InvalidModel) as info:
        parse_mlmodel(mlmodel(flavors), "s3://b/m/")
    assert info.value.status == 422
    assert "sklearn, python_function" in info.value.message
    assert "supported: onnx" in info.value.message


@pytest.mark.parametrize("text", ["{{not yaml", "just a string", "flavors: 3"])
def test_unreadable_mlmodel_is_invalid(text: str) -> None:
    with pytest.raises(InvalidModel):
        parse_mlmodel(text, "here")


@pytest.mark.parametrize("data", ["../../etc/passwd", "/etc/passwd", ".."])
def test_model_file_must_stay_in_the_directory(data: str) -> None:
    with pytest.raises(InvalidModel, match="leaves the model directory"):
        parse_mlmodel(mlmodel(f"  onnx:\n    data: {data}\n"), "here")


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/fraud/3", ("version", "fraud", "3")),
        ("models:/fraud@champion", ("alias", "fraud", "champion")),
        ("models:/fraud/Production", ("stage", "fraud", "Production")),
        ("models:/fraud/latest", ("latest", "fraud", "")),
        ("models:/fraud/LATEST", ("latest", "fraud", "")),
        ("models:/m-0123abcd", ("logged", "m-0123abcd", "")),
        ("models:///fraud/3", ("version", "fraud", "3")),
    ],
)
def test_models_uri_forms(uri: str, parsed: tuple[str, str, str]) -> None:
    assert parse_models_uri(uri) == parsed


@pytest.mark.parametrize(
    "uri", ["models:", "models:/", "models:fraud/1", "models:/a/b/c", "models:/@x", "models:/a//"]
)
def test_bad_models_uris(uri: str) -> None:
    with pytest.raises(InvalidUri):
        parse_models_uri(uri)


def test_runs_and_s3_uris() -> None:
    assert parse_runs_uri("runs:/abc/model") == ("abc", "model")
    assert parse_runs_uri("runs:/abc/a/b/") == ("abc", "a/b")
    assert parse_s3_uri("s3://bucket/models/x/1/") == ("bucket", "models/x/1/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(InvalidUri):
        parse_runs_uri("runs:/")
    with pytest.raises(InvalidUri):
        parse_s3_uri("s3:///key")


def test_redaction() -> None:
    assert redact("http://user:pw@host:5000/x") == "http://***@host:5000/x"
    assert redact("see https://tok@h/a and s3://b/k") == "see https://***@h/a and s3://b/k"
    assert (
        redact("https://h/o?X-Amz-Signature=abc&x=1&token=zz")
        == "https://h/o?X-Amz-Signature=***&x=1&token=***"
    )
    register_secret("short")  # too short to mask safely
    register_secret("a-registered-secret-value")
    assert redact("key a-registered-secret-value and short") == "key *** and short"


def test_load_errors_are_redacted_and_copyable() -> None:
    register_secret("another-secret-value-123")
    error = InvalidModel("http://u:p@h failed with another-secret-value-123")
    assert error.message == str(error) == "http://***@h failed with ***"
    copy = error.copy()
    assert type(copy) is InvalidModel and copy.message == error.message and copy is not error
    assert isinstance(copy, LoadError) and copy.status == 422
