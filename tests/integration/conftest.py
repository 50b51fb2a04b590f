"""Fixtures that start the real stack; each is stopped in ``finally``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model_server import demo
from tests import models

from .server import Server


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model repository with every model the integration tests use."""
    repo = tmp_path_factory.mktemp("repo")
    demo.write(repo)
    models.linear(repo / "linear" / "1" / "model.onnx", features=3)
    models.sklearn_classifier(repo / "credit" / "1" / "model.onnx", ["amount", "age", "score"])
    models.multi_dtype(repo / "multi" / "1" / "model.onnx")
    models.expand(repo / "expand" / "1" / "model.onnx")
    models.slow(repo / "slow" / "1" / "model.onnx")
    models.linear(repo / "linear" / "2" / "model.onnx", features=3, seed=7)
    models.identity_types(repo / "types" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    """Two workers, one frontend, the demo model loaded at start, CORS on, small body limit."""
    models_file = repository.parent / "startup-models.yaml"
    models_file.write_text('models:\n  - model_id: fraud_detection\n    version: "2.0.0"\n')
    srv = Server(
        repository,
        workers=2,
        MODEL_SERVER_MODELS_FILE=models_file,
        MODEL_SERVER_CORS_ORIGINS="http://app.example.test",
        MODEL_SERVER_MAX_REQUEST_BYTES=2 * 1024 * 1024,
        MODEL_SERVER_ALLOWED_LOCAL_ROOTS=repository.parent,  # the session temp dir: tests load from tmp_path
    )
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
