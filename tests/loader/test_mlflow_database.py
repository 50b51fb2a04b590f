"""An MLflow registry kept in a sqlite database (MLFLOW_TRACKING_URI=sqlite:///…), read
with MLflow's own client: no tracking server at all, artifacts on the local disk."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import loader
from loader.errors import ModelNotFound, SourceUnavailable

from .builders import FEATURES, BuiltModel, assert_same_outputs, sklearn_model
from .conftest import PIP_REQUIREMENTS, SettingsFactory


@dataclass
class Store:
    uri: str
    first: BuiltModel
    second: BuiltModel
    run_id: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    import mlflow
    import mlflow.onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    work = tmp_path_factory.mktemp("mlflow-sqlite")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    first, second = sklearn_model(4), sklearn_model(5)
    signature = ModelSignature(inputs=Schema([ColSpec("float", name) for name in FEATURES]))
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("local", artifact_location=(work / "artifacts").as_uri())
        run_ids = []
        for built in (first, second):
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.onnx.log_model(
                    built.proto,
                    name="model",
                    signature=signature,
                    registered_model_name="local-fraud",
                    pip_requirements=PIP_REQUIREMENTS,
                )
            run_ids.append(run.info.run_id)
        client.set_registered_model_alias("local-fraud", "champion", "1")
    yield Store(uri, first, second, run_ids[0])


def _load(uri: str, settings: Any) -> tuple[Any, Any]:
    return loader.load_artifact("m", "1", uri, settings, lambda _: None)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/local-fraud/1", "first"),
        ("models:/local-fraud/2", "second"),
        ("models:/local-fraud@champion", "first"),
        ("models:/local-fraud/latest", "second"),
    ],
)
def test_registered_versions_from_a_sqlite_registry(
    store: Store, make_settings: SettingsFactory, uri: str, expected: str
) -> None:
    settings = make_settings(mlflow_tracking_uri=store.uri)
    artifact, schema = _load(uri, settings)
    built: BuiltModel = getattr(store, expected)
    assert_same_outputs(artifact.path, built)
    assert schema.feature_names == FEATURES  # the MLmodel signature, as with a tracking server


def test_runs_uri_and_default_rule(store: Store, make_settings: SettingsFactory) -> None:
    settings = make_settings(mlflow_tracking_uri=store.uri)
    artifact, _ = _load(f"runs:/{store.run_id}/model", settings)
    assert_same_outputs(artifact.path, store.first)
    # registry_uri omitted with MLFLOW_TRACKING_URI set: the registered model <id>/<version>.
    artifact, _ = loader.load_artifact("local-fraud", "2", None, settings, lambda _: None)
    assert_same_outputs(artifact.path, store.second)


def test_errors_from_a_sqlite_registry(store: Store, make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(mlflow_tracking_uri=store.uri)
    with pytest.raises(ModelNotFound) as missing:
        _load("models:/local-fraud/7", settings)
    assert missing.value.status == 404 and "local-fraud" in missing.value.message
    with pytest.raises(ModelNotFound):
        _load("models:/nobody@champion", settings)
    # A database that is not there is reported, and not created by the read.
    absent = tmp_path / "absent.db"
    with pytest.raises(SourceUnavailable, match="no MLflow database") as info:
        _load("models:/local-fraud/1", make_settings(mlflow_tracking_uri=f"sqlite:///{absent}"))
    assert info.value.status == 502
    assert not absent.exists()
