"""JSON log lines of one inference carry its model, in the frontend and in the worker (README)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def json_server(repository: Path) -> Iterator[Server]:
    srv = Server(repository, workers=1, MODEL_SERVER_LOG_FORMAT="json")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _entries(server: Server, request_id: str) -> list[dict[str, Any]]:
    entries = []
    for line in server.log().splitlines():
        if request_id in line and line.startswith("{"):
            entries.append(orjson.loads(line))
    return entries


def test_inference_log_lines_name_the_model(json_server: Server, repository: Path) -> None:
    c = json_server.client
    assert c.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
    assert c.post("/v1/models/load", json={"model_id": "expand", "version": "1"}).status_code == 200
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]], dtype=np.float32)
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = c.post("/v2/models/linear/infer", json=body, headers={"X-Request-ID": "json-log-ok-1"})
    assert r.status_code == 200, r.text
    want = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    for out in r.json()["outputs"]:
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want[out["name"]], rtol=1e-6)
    # A shape ONNX Runtime refuses: the worker logs the failure with the request's id and model.
    bad = {"model_id": "expand", "model_version": "1", "inputs": {"x": [[1.0], [2.0]], "shape": [3, 2]}}
    assert c.post("/v1/infer", json=bad, headers={"X-Request-ID": "json-log-bad-2"}).status_code == 422

    json_server.wait_for(lambda: len(_entries(json_server, "json-log-bad-2")) >= 2, 10, "the log lines")
    access = [e for e in _entries(json_server, "json-log-ok-1") if e["logger"] == "model_server.access"]
    assert [(e["role"], e["model"]) for e in access] == [("frontend", "linear:1")], access
    failed = _entries(json_server, "json-log-bad-2")
    assert {(e["role"].split("-")[0], e["model"]) for e in failed} == {
        ("frontend", "expand:1"),
        ("worker", "expand:1"),
    }, failed
    # A request that names no model it could run logs "-", as every line outside a request does.
    assert c.get("/v1/models", headers={"X-Request-ID": "json-log-list-3"}).status_code == 200
    json_server.wait_for(lambda: bool(_entries(json_server, "json-log-list-3")), 10, "the access line")
    assert {e["model"] for e in _entries(json_server, "json-log-list-3")} == {"-"}
