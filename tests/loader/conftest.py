"""One MLflow registry and S3 bucket, filled once per session for the loader tests.

The MLflow server (``tests.services``) starts first; the models are built while
it boots, then logged with ``mlflow.onnx.log_model`` (artifacts in moto's S3, or
proxied by the server for ``mlflow-artifacts:``) and uploaded to S3 directly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from loader import cache as cache_module
from loader.mlflow_source import mlflow_environment
from model_server.settings import Settings
from tests.services import MlflowServer, MotoServer

from .builders import FEATURES, BuiltModel, dense_model, sklearn_model

S3_BUCKET = "models"
PIP_REQUIREMENTS = ["onnx", "onnxruntime"]
MIXED_SIGNATURE = {"amount": "FP64", "count": "INT64", "tag": "BYTES", "flag": "BOOL"}
UNSUPPORTED_MLMODEL = """\
artifact_path: model
flavors:
  sklearn:
    pickled_model: model.pkl
    sklearn_version: 1.5.0
  python_function:
    loader_module: mlflow.sklearn
    model_path: model.pkl
"""


@dataclass
class World:
    """What the session put in the registry and the bucket."""

    tracking_uri: str
    moto: MotoServer
    fraud_v1: BuiltModel
    fraud_v2: BuiltModel
    dense: BuiltModel
    proxied: BuiltModel
    fraud_v1_run: str
    fraud_v1_logged_model: str
    raw_run: str
    proxied_location: str  # mlflow-artifacts:/... of the proxied model's directory
    local_mlflow_dir: Path  # an MLflow onnx model directory on the local disk


def _upload_dir(client: object, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def world(
    mlflow_server: MlflowServer, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    # Built while the MLflow server boots.
    fraud_v1, fraud_v2, dense, proxied = sklearn_model(0), sklearn_model(1), dense_model(), sklearn_model(2)
    import mlflow
    import mlflow.onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    work = tmp_path_factory.mktemp("world")
    s3 = moto_server.client()
    s3.create_bucket(Bucket=S3_BUCKET)
    s3.put_object(Bucket=S3_BUCKET, Key="plain/model.onnx", Body=fraud_v1.reference)
    s3.put_object(Bucket=S3_BUCKET, Key="single/fraud.onnx", Body=fraud_v2.reference)
    s3.put_object(Bucket=S3_BUCKET, Key="models/iris/3/model.onnx", Body=fraud_v2.reference)
    s3.put_object(Bucket=S3_BUCKET, Key="garbage/model.onnx", Body=b"this is not an ONNX model")
    s3.put_object(Bucket=S3_BUCKET, Key="sklearn/MLmodel", Body=UNSUPPORTED_MLMODEL.encode())
    s3.put_object(Bucket=S3_BUCKET, Key="sklearn/model.pkl", Body=b"pickle")

    fraud_sig = ModelSignature(inputs=Schema([ColSpec("float", name) for name in FEATURES]))
    mixed_types = {"FP64": "double", "INT64": "long", "BYTES": "string", "BOOL": "boolean"}
    mixed_sig = ModelSignature(
        inputs=Schema([ColSpec(mixed_types[t], name) for name, t in MIXED_SIGNATURE.items()])
    )
    local_dir = work / "local-mlflow-model"
    mlflow.onnx.save_model(
        onnx.ModelProto.FromString(dense.reference),
        str(local_dir),
        signature=mixed_sig,
        pip_requirements=PIP_REQUIREMENTS,  # given, so MLflow does not spend seconds inferring them
    )
    _upload_dir(s3, local_dir, S3_BUCKET, "mlflowdir")

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in mlflow_server.env.items():
            mp.setenv(key, value)
        tracking_uri = mlflow_server.tracking_uri  # waits for the server
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = client.create_experiment("loader")

        def log(built: BuiltModel, registered: str, signature: ModelSignature, exp: str) -> tuple[str, str]:
            with mlflow.start_run(experiment_id=exp) as run:
                info = mlflow.onnx.log_model(
                    built.proto,
                    name="model",
                    signature=signature,
                    registered_model_name=registered,
                    pip_requirements=PIP_REQUIREMENTS,
                )
            return run.info.run_id, str(info.model_id)

        fraud_v1_run, fraud_v1_model = log(fraud_v1, "fraud", fraud_sig, experiment)
        log(fraud_v2, "fraud", fraud_sig, experiment)
        log(dense, "dense", mixed_sig, experiment)
        client.set_registered_model_alias("fraud", "champion", "1")
        client.transition_model_version_stage("fraud", "1", "Production")

        raw = work / "raw"
        raw.mkdir()
        (raw / "model.onnx").write_bytes(fraud_v2.reference)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(raw / "model.onnx"), artifact_path="raw")
        raw_run = run.info.run_id

        proxied_exp = client.create_experiment(
            "loader-proxied", artifact_location="mlflow-artifacts:/proxied-exp"
        )
        _, proxied_model = log(proxied, "proxied", fraud_sig, proxied_exp)
        proxied_location = client.get_logged_model(proxied_model).artifact_location

        client.create_registered_model("sklearn-model")
        client.create_model_version("sklearn-model", f"s3://{S3_BUCKET}/sklearn")

    yield World(
        tracking_uri=tracking_uri,
        moto=moto_server,
        fraud_v1=fraud_v1,
        fraud_v2=fraud_v2,
        dense=dense,
        proxied=proxied,
        fraud_v1_run=fraud_v1_run,
        fraud_v1_logged_model=fraud_v1_model,
        raw_run=raw_run,
        proxied_location=proxied_location,
        local_mlflow_dir=local_dir,
    )


SettingsFactory = Callable[..., Settings]


@pytest.fixture(autouse=True)
def _mlflow_environment() -> Iterator[None]:
    """A source sets MLflow's process-wide HTTP variables from its settings (as the coordinator
    does once): restore them after each test, so one test's 1 s timeout or zero retries cannot
    reach the next one, nor the session fixtures that log models."""
    names = list(mlflow_environment(Settings()))
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def make_settings(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettingsFactory]:
    """``make_settings(**fields)``: Settings for one test with its own cache dir and repository.

    Local models may come from anywhere under the session's temporary directory
    (the policy's own tests pass ``allowed_local_roots`` themselves).
    """

    def make(**fields: object) -> Settings:
        values: dict[str, object] = {
            "cache_dir": tmp_path / "cache",
            "model_repository": tmp_path / "repo",
            "allowed_local_roots": [tmp_path_factory.getbasetemp()],
            "mlflow_tracking_uri": None,
            "aws_s3_bucket": None,
            "download_timeout_s": 5.0,
        }
        values.update(fields)
        return Settings(**values)  # type: ignore[arg-type]

    yield make
    cache_module._caches.pop((tmp_path / "cache").resolve(), None)
