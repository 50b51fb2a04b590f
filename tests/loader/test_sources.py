"""Every URI form, against a real MLflow tracking server and moto's S3 (tests.services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import loader
from loader.artifact import Progress
from loader.errors import InvalidModel, InvalidUri, ModelNotFound, SourceUnavailable, UnsupportedSource
from tests.services import closed_port_url

from .builders import FEATURES, BuiltModel, assert_same_outputs
from .conftest import MIXED_SIGNATURE, S3_BUCKET, SettingsFactory, World

FP32_RECORD = dict.fromkeys(FEATURES, "FP32")


def load(uri: str | None, settings: Any, model_id: str = "m", version: str = "1") -> tuple[Any, Any]:
    events: list[Progress] = []
    artifact, schema = loader.load_artifact(model_id, version, uri, settings, events.append)
    if artifact.downloaded:
        assert events, "a download reports progress"
        assert events[-1].done == events[-1].total > 0
    return artifact, schema


def check(artifact: Any, built: BuiltModel, cache_dir: Path | None) -> None:
    assert artifact.path.is_file()
    if cache_dir is not None:
        assert artifact.path.is_relative_to(cache_dir.resolve())
    assert_same_outputs(artifact.path, built)


# --- models:/ ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [("/1", "fraud_v1"), ("/2", "fraud_v2"), ("@champion", "fraud_v1"), ("/Production", "fraud_v1"),
     ("/production", "fraud_v1"), ("/latest", "fraud_v2")],
)  # fmt: skip
def test_registered_model_uris(
    world: World, aws_env: object, make_settings: SettingsFactory, suffix: str, expected: str
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    artifact, schema = load(f"models:/fraud{suffix}", settings)
    check(artifact, getattr(world, expected), settings.cache_dir)
    assert artifact.downloaded
    assert artifact.source_uri == f"models:/fraud{suffix}"
    # The MLmodel signature defines the record schema.
    assert artifact.feature_names == FEATURES
    assert schema.feature_names == FEATURES
    assert schema.feature_types == FP32_RECORD


def test_mlflow_s3_endpoint_url_alone_reaches_the_registrys_artifacts(
    world: World, aws_env: object, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MinIO-style MLflow setup sets only MLFLOW_S3_ENDPOINT_URL, as MLflow itself reads it."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", world.moto.endpoint)
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    assert settings.mlflow_s3_endpoint_url == world.moto.endpoint
    artifact, _ = load("models:/fraud/2", settings)
    check(artifact, world.fraud_v2, settings.cache_dir)
    assert artifact.downloaded
    # Without it, boto3 goes to AWS itself, which is unreachable from here: no silent fallback.
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri, download_timeout_s=2.0)
    assert settings.mlflow_s3_endpoint_url is None
    with pytest.raises(SourceUnavailable, match="unreachable"):
        load("models:/fraud/1", settings)


def test_logged_model_id(world: World, aws_env: object, make_settings: SettingsFactory) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    artifact, _ = load(f"models:/{world.fraud_v1_logged_model}", settings)
    check(artifact, world.fraud_v1, settings.cache_dir)


def test_external_data_and_typed_signature(
    world: World, aws_env: object, make_settings: SettingsFactory
) -> None:
    """mlflow.onnx keeps large weights in a separate file: it is fetched and verified too."""
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    artifact, schema = load("models:/dense/1", settings)
    check(artifact, world.dense, settings.cache_dir)
    data_files = [
        p for p in artifact.path.parent.iterdir() if p.name not in {"model.onnx", "MLmodel", "meta.json"}
    ]
    assert data_files, "the external-data file sits next to model.onnx"
    assert artifact.size > artifact.path.stat().st_size
    assert schema.feature_names == list(MIXED_SIGNATURE)
    assert schema.feature_types == MIXED_SIGNATURE


# --- runs:/ and mlflow-artifacts:/ -------------------------------------------------------------------


def test_runs_uri_of_a_logged_model(world: World, aws_env: object, make_settings: SettingsFactory) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    artifact, schema = load(f"runs:/{world.fraud_v1_run}/model", settings)
    check(artifact, world.fraud_v1, settings.cache_dir)
    assert schema.feature_names == FEATURES


@pytest.mark.parametrize("path", ["raw", "raw/", "raw/model.onnx"])
def test_runs_uri_of_run_artifacts(
    world: World, aws_env: object, make_settings: SettingsFactory, path: str
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    artifact, _ = load(f"runs:/{world.raw_run}/{path}", settings)
    check(artifact, world.fraud_v2, settings.cache_dir)


def test_mlflow_artifacts_uri(world: World, aws_env: object, make_settings: SettingsFactory) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    assert world.proxied_location.startswith("mlflow-artifacts:/")
    artifact, schema = load(world.proxied_location, settings)
    check(artifact, world.proxied, settings.cache_dir)
    assert schema.feature_names == FEATURES
    # The same file named directly, and with the server in the URI.
    host = world.tracking_uri.removeprefix("http://")
    path = world.proxied_location.removeprefix("mlflow-artifacts:")
    artifact, _ = load(f"mlflow-artifacts://{host}{path}/model.onnx", settings)
    check(artifact, world.proxied, settings.cache_dir)


def test_registered_model_behind_the_artifact_proxy(
    world: World, aws_env: object, make_settings: SettingsFactory
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    first, _ = load("models:/proxied/1", settings)
    check(first, world.proxied, settings.cache_dir)
    second, _ = load("models:/proxied/1", settings)
    assert first.downloaded and not second.downloaded
    assert second.path == first.path


# --- s3:// ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [("plain/", "fraud_v1"), ("plain", "fraud_v1"), ("plain/model.onnx", "fraud_v1"),
     ("single/fraud.onnx", "fraud_v2")],
)  # fmt: skip
def test_s3_uris(
    world: World, aws_env: object, make_settings: SettingsFactory, key: str, expected: str
) -> None:
    settings = make_settings()
    artifact, _ = load(f"s3://{S3_BUCKET}/{key}", settings)
    check(artifact, getattr(world, expected), settings.cache_dir)
    assert artifact.downloaded


def test_s3_prefix_holding_an_mlflow_model(
    world: World, aws_env: object, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    artifact, schema = load(f"s3://{S3_BUCKET}/mlflowdir/", settings)
    check(artifact, world.dense, settings.cache_dir)
    assert schema.feature_types == MIXED_SIGNATURE


# --- local ------------------------------------------------------------------------------------------


def test_local_path_and_file_uri(world: World, tmp_path: Path, make_settings: SettingsFactory) -> None:
    settings = make_settings()
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(world.fraud_v1.reference)
    for uri in (str(model), str(model.parent), model.as_uri(), model.parent.as_uri()):
        artifact, _ = load(uri, settings)
        assert artifact.path == model.resolve()
        assert not artifact.downloaded
        assert not loader.pin(artifact), "local files are not in the cache"
        loader.release(artifact)  # a no-op
        check(artifact, world.fraud_v1, None)
    artifact, schema = load(world.local_mlflow_dir.as_uri(), settings)
    check(artifact, world.dense, None)
    assert schema.feature_types == MIXED_SIGNATURE


# --- registry_uri omitted -----------------------------------------------------------------------------


def test_default_uri_rule(
    world: World, aws_env: object, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    # 1. MLFLOW_TRACKING_URI set: the registered model <model_id> version <version> (AWS_S3_BUCKET ignored).
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri, aws_s3_bucket=S3_BUCKET)
    assert loader.default_uri("fraud", "2", settings) == "models:/fraud/2"
    artifact, _ = load(None, settings, "fraud", "2")
    check(artifact, world.fraud_v2, settings.cache_dir)
    # 2. only AWS_S3_BUCKET: s3://<bucket>/models/<model_id>/<version>/.
    settings = make_settings(aws_s3_bucket=S3_BUCKET)
    assert loader.default_uri("iris", "3", settings) == f"s3://{S3_BUCKET}/models/iris/3/"
    artifact, _ = load(None, settings, "iris", "3")
    check(artifact, world.fraud_v2, settings.cache_dir)
    # 3. neither: the local model repository.
    settings = make_settings()
    local = settings.model_repository / "iris" / "3" / "model.onnx"
    local.parent.mkdir(parents=True)
    local.write_bytes(world.fraud_v1.reference)
    artifact, _ = load(None, settings, "iris", "3")
    assert artifact.path == local.resolve()
    check(artifact, world.fraud_v1, None)


# --- errors a user can act on ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("models:/no-such-model/1", ["no-such-model", "not found"]),
        ("models:/fraud/99", ["version=99", "not found"]),
        ("models:/fraud@no-such-alias", ["no-such-alias", "not found"]),
        ("models:/fraud/Staging", ["fraud", "Staging"]),
        ("models:/no-such-model/latest", ["no-such-model", "not found"]),
        ("runs:/0123456789abcdef0123456789abcdef/model", ["0123456789abcdef0123456789abcdef", "not found"]),
        ("RUN/nothing-here", ["nothing-here"]),
    ],
)
def test_unknown_model_is_404_with_the_registry_message(
    world: World, aws_env: object, make_settings: SettingsFactory, uri: str, words: list[str]
) -> None:
    uri = uri.replace("RUN", f"runs:/{world.raw_run}")
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    with pytest.raises(ModelNotFound) as info:
        load(uri, settings)
    assert info.value.status == 404
    for word in words:
        assert word.lower() in info.value.message.lower()


@pytest.mark.parametrize(
    ("key", "words"),
    [("nothing/here/", [f"s3://{S3_BUCKET}/nothing/here"]), ("nothing.onnx", ["nothing.onnx"])],
)
def test_missing_s3_object_is_404(
    aws_env: object, make_settings: SettingsFactory, key: str, words: list[str]
) -> None:
    with pytest.raises(ModelNotFound) as info:
        load(f"s3://{S3_BUCKET}/{key}", make_settings())
    assert info.value.status == 404
    assert all(word in info.value.message for word in words)


def test_missing_bucket_is_404(aws_env: object, make_settings: SettingsFactory) -> None:
    with pytest.raises(ModelNotFound, match="no-such-bucket"):
        load("s3://no-such-bucket/models/x/", make_settings())


def test_not_onnx_is_422_and_nothing_is_cached(aws_env: object, make_settings: SettingsFactory) -> None:
    settings = make_settings()
    with pytest.raises(InvalidModel) as info:
        load(f"s3://{S3_BUCKET}/garbage/", settings)
    assert info.value.status == 422
    assert "not a valid ONNX model" in info.value.message
    assert list((settings.cache_dir / "objects").iterdir()) == []
    assert list((settings.cache_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("uri", ["models:/sklearn-model/1", f"s3://{S3_BUCKET}/sklearn/"])
def test_unsupported_flavor_is_422_naming_the_supported_ones(
    world: World, aws_env: object, make_settings: SettingsFactory, uri: str
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    with pytest.raises(InvalidModel) as info:
        load(uri, settings)
    assert info.value.status == 422
    assert "sklearn" in info.value.message
    assert "supported: onnx" in info.value.message


def test_mlflow_uri_without_tracking_server_is_400(make_settings: SettingsFactory) -> None:
    with pytest.raises(UnsupportedSource, match="MLFLOW_TRACKING_URI") as info:
        load("models:/fraud/1", make_settings())
    assert info.value.status == 400


@pytest.mark.parametrize("uri", ["models:/", "models:/a/b/c", "models:/name@", "runs:/", "s3://"])
def test_malformed_uri_is_400(world: World, make_settings: SettingsFactory, uri: str) -> None:
    with pytest.raises(InvalidUri) as info:
        load(uri, make_settings(mlflow_tracking_uri=world.tracking_uri))
    assert info.value.status == 400


def test_other_artifact_stores_go_through_mlflow_download(
    world: World, make_settings: SettingsFactory
) -> None:
    """GCS, Azure, HDFS...: MLflow downloads, the cache keys the result by its content."""
    from loader.mlflow_source import MlflowSource

    source = MlflowSource(make_settings(mlflow_tracking_uri=world.tracking_uri))
    uri = world.local_mlflow_dir.as_uri()
    first = source._fetch_generic(uri, "gs://bucket/model", lambda _: None)
    second = source._fetch_generic(uri, "gs://bucket/model", lambda _: None)
    assert first.downloaded and first.path == second.path
    assert first.feature_types == MIXED_SIGNATURE
    assert_same_outputs(first.path, world.dense)
