"""The whole stack loading from a real MLflow registry and a real S3 server (moto), on 127.0.0.1."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.models import ort_run, sklearn_classifier
from tests.services import MlflowServer, MotoServer

from .server import Server

pytestmark = pytest.mark.integration

FEATURES = ["tenure", "balance", "utilisation"]
BUCKET = "e2e-models"


@dataclass
class Registry:
    model_path: Path  # the ONNX file as built in the test: the reference
    env: dict[str, str]


@pytest.fixture(scope="module")
def registry(
    mlflow_server: MlflowServer, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Registry:
    import mlflow
    import mlflow.onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    work = tmp_path_factory.mktemp("e2e-registry")
    path = sklearn_classifier(work / "churn.onnx", FEATURES, seed=5)
    s3 = moto_server.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(path), BUCKET, "teams/churn/7/model.onnx")
    s3.upload_file(str(path), BUCKET, "models/churn_s3/3/model.onnx")  # the AWS_S3_BUCKET layout
    signature = ModelSignature(inputs=Schema([ColSpec("float", name) for name in FEATURES]))
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in mlflow_server.env.items():
            mp.setenv(key, value)
        client = mlflow.MlflowClient(tracking_uri=mlflow_server.tracking_uri)
        experiment = client.create_experiment("e2e")
        with mlflow.start_run(experiment_id=experiment):
            mlflow.onnx.log_model(
                onnx.load(str(path)),
                name="model",
                signature=signature,
                registered_model_name="churn",
                pip_requirements=["onnx"],
            )
        client.set_registered_model_alias("churn", "champion", "1")
    return Registry(path, mlflow_server.env)


@pytest.fixture(scope="module")
def registry_server(registry: Registry, repository: Path) -> Iterator[Server]:
    srv = Server(repository, workers=1, **registry.env)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _records(x: np.ndarray) -> list[dict[str, float]]:
    return [dict(zip(FEATURES, map(float, row), strict=True)) for row in x]


def _expected(registry: Registry, x: np.ndarray) -> dict[str, np.ndarray]:
    name = onnx.load(str(registry.model_path)).graph.input[0].name
    return ort_run(registry.model_path, {name: x})


@pytest.mark.parametrize(
    ("model_id", "version", "uri"),
    [
        ("churn", "1", "models:/churn/1"),
        ("churn_champion", "1", "models:/churn@champion"),
        ("churn_s3", "7", f"s3://{BUCKET}/teams/churn/7/"),
        ("churn", "1", None),  # MLFLOW_TRACKING_URI set: the registered model churn, version 1
    ],
)
def test_load_from_registry_and_s3_and_serve(
    registry_server: Server, registry: Registry, model_id: str, version: str, uri: str | None
) -> None:
    c = registry_server.client
    body = {"model_id": model_id, "version": version, **({"registry_uri": uri} if uri else {})}
    loaded = c.post("/v1/models/load", json=body)
    assert loaded.status_code == 200, loaded.text
    entry = loaded.json()
    assert entry["state"] == "ready"
    if uri and uri.startswith("models:"):
        # The MLmodel signature defines the record schema.
        assert entry["feature_names"] == FEATURES
    x = np.random.default_rng(8).normal(size=(5, 3)).astype(np.float32)
    # Records in another field order: the schema orders them.
    records = [{k: r[k] for k in reversed(FEATURES)} for r in _records(x)] if entry["feature_names"] else None
    if records is None:
        name = entry["inputs"][0]["name"]
        response = c.post(
            "/v1/infer", json={"model_id": model_id, "model_version": version, "inputs": {name: x.tolist()}}
        )
    else:
        response = c.post(
            "/v1/infer", json={"model_id": model_id, "model_version": version, "inputs": records}
        )
    assert response.status_code == 200, response.text
    expected = _expected(registry, x)
    outputs = response.json()["outputs"]
    assert [o["label"] for o in outputs] == expected["label"].tolist()
    np.testing.assert_allclose([o["probabilities"] for o in outputs], expected["probabilities"], rtol=1e-6)
    assert c.delete(f"/v1/models/{model_id}/{version}").status_code == 200


def test_registry_errors_reach_the_client(registry_server: Server) -> None:
    c = registry_server.client
    r = c.post(
        "/v1/models/load", json={"model_id": "nobody", "version": "1", "registry_uri": "models:/nobody/1"}
    )
    assert r.status_code == 404, r.text
    assert "nobody" in r.json()["error"]["message"]
    r = c.post(
        "/v1/models/load", json={"model_id": "x", "version": "1", "registry_uri": f"s3://{BUCKET}/missing/"}
    )
    assert r.status_code == 404, r.text
    secret = registry_server.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in r.text and secret not in registry_server.log()
    r = c.post(
        "/v1/models/load", json={"model_id": "x", "version": "1", "registry_uri": "ftp://somewhere/model"}
    )
    assert r.status_code == 400, r.text


def test_s3_bucket_rule_when_no_registry(
    registry: Registry, moto_server: MotoServer, repository: Path
) -> None:
    env = {k: v for k, v in registry.env.items() if k != "MLFLOW_TRACKING_URI"}
    server = Server(repository, workers=1, AWS_S3_BUCKET=BUCKET, **env)
    try:
        server.start()
        c = server.client
        r = c.post("/v1/models/load", json={"model_id": "churn_s3", "version": "3"})
        assert r.status_code == 200, r.text
        assert r.json()["registry_uri"].startswith(f"s3://{BUCKET}/models/churn_s3/3")
        x = np.random.default_rng(9).normal(size=(3, 3)).astype(np.float32)
        name = r.json()["inputs"][0]["name"]
        v2 = c.post(
            "/v2/models/churn_s3/infer",
            json={
                "inputs": [
                    {"name": name, "shape": [3, 3], "datatype": "FP32", "data": x.reshape(-1).tolist()}
                ]
            },
        )
        assert v2.status_code == 200, v2.text
        labels = next(o for o in v2.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == _expected(registry, x)["label"].tolist()
        # Loaded again after an unload: served from the verified cache.
        assert c.delete("/v1/models/churn_s3/3").status_code == 200
        assert c.post("/v1/models/load", json={"model_id": "churn_s3", "version": "3"}).status_code == 200
    finally:
        server.stop()
