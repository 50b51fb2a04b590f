"""The LRU session cache seen from outside, dynamic batching, ZipMap outputs, coordinator restart."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import models
from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration


def _listed(server: Server) -> dict[tuple[str, str], dict[str, object]]:
    return {(m["model_id"], m["version"]): m for m in server.client.get("/v1/models").json()["models"]}


def test_lru_evicts_and_brings_models_back_on_demand(repository: Path) -> None:
    server = Server(repository, workers=1, MODEL_SERVER_WORKER_MAX_MODELS=2)
    try:
        server.start()
        c = server.client
        x = np.arange(6, dtype=np.float32).reshape(2, 3) / 5

        def infer(version: str) -> httpx.Response:
            return c.post(
                "/v1/infer",
                json={"model_id": "linear", "model_version": version, "inputs": {"x": x.tolist()}},
            )

        for version in ("1", "2"):
            assert (
                c.post("/v1/models/load", json={"model_id": "linear", "version": version}).status_code == 200
            )
        assert infer("1").status_code == 200  # version 1 is now the most recently used
        # A third model does not fit two slots: the least recently used (version 2) goes.
        assert c.post("/v1/models/load", json={"model_id": "credit", "version": "1"}).status_code == 200
        listed = _listed(server)
        assert listed[("linear", "2")]["workers"] == [] and listed[("linear", "2")]["state"] == "ready"
        assert listed[("linear", "1")]["workers"] == [0]
        evictions = [line for line in server.log().splitlines() if "evicted linear:2" in line]
        assert evictions, "the coordinator logs the eviction"
        # Asking for the evicted model brings it back (evicting the LRU one) and answers correctly.
        r = infer("2")
        assert r.status_code == 200, r.text
        expected = ort_run(repository / "linear" / "2" / "model.onnx", {"x": x})
        np.testing.assert_allclose([o["scores"] for o in r.json()["outputs"]], expected["scores"], rtol=1e-6)
        assert _listed(server)[("linear", "2")]["workers"] == [0]
        metrics = c.get("/metrics").text
        assert "model_server_evictions_total 2.0" in metrics
    finally:
        server.stop()


def test_dynamic_batching_merges_concurrent_requests(repository: Path) -> None:
    server = Server(repository, workers=1)
    try:
        server.start()
        c = server.client
        r = c.post(
            "/v1/models/load",
            json={"model_id": "linear", "version": "1", "max_batch_size": 64, "max_queue_delay_us": 20000},
        )
        assert r.status_code == 200, r.text
        assert r.json()["batching"]["max_batch_size"] == 64
        rng = np.random.default_rng(4)
        batches = [rng.normal(size=(int(n), 3)).astype(np.float32) for n in rng.integers(1, 6, size=24)]

        def send(x: np.ndarray) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return client.post(
                    "/v1/infer",
                    json={"model_id": "linear", "model_version": "1", "inputs": {"x": x.tolist()}},
                )

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(send, batches))
        for x, response in zip(batches, responses, strict=True):
            assert response.status_code == 200, response.text
            expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
            np.testing.assert_allclose(
                [o["scores"] for o in response.json()["outputs"]], expected["scores"], rtol=1e-5
            )
            assert [o["label"] for o in response.json()["outputs"]] == expected["label"].tolist()
        text = c.get("/metrics").text
        calls = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("model_server_batch_size_rows_count") and 'model="linear"' in line
        )
        rows = sum(len(x) for x in batches)
        # Fewer ONNX Runtime calls than requests: requests were merged (rows counted once each).
        assert calls < len(batches)
        row_sum = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("model_server_batch_size_rows_sum") and 'model="linear"' in line
        )
        assert row_sum == rows
    finally:
        server.stop()


def test_zipmap_classifier_outputs_come_back_as_objects(repository: Path, tmp_path: Path) -> None:
    path = models.sklearn_classifier(tmp_path / "zip" / "model.onnx", ["a", "b"], seed=2, zipmap=True)
    server = Server(repository, workers=1, MODEL_SERVER_ALLOWED_LOCAL_ROOTS=tmp_path)
    try:
        server.start()
        c = server.client
        r = c.post("/v1/models/load", json={"model_id": "zip", "version": "1", "registry_uri": str(path)})
        assert r.status_code == 200, r.text
        records = [{"a": 0.5, "b": -1.0}, {"a": -2.0, "b": 3.0}]
        r = c.post("/v1/infer", json={"model_id": "zip", "inputs": records})
        assert r.status_code == 200, r.text
        x = np.array([[0.5, -1.0], [-2.0, 3.0]], dtype=np.float32)
        expected = ort_run(
            path, {"float_input": x} if "float_input" in _names(path) else {_names(path)[0]: x}
        )
        outputs = r.json()["outputs"]
        assert [o["output_label"] for o in outputs] == expected["output_label"].tolist()
        for got, want in zip(outputs, expected["output_probability"], strict=True):
            assert {int(k): v for k, v in got["output_probability"].items()} == pytest.approx(want)
    finally:
        server.stop()


def _names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.input]


def test_coordinator_restart_keeps_the_model_set(repository: Path) -> None:
    server = Server(repository, workers=1)
    try:
        server.start()
        c = server.client
        assert c.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
        old = server.processes()["coordinator"]
        os.kill(old.pid, signal.SIGKILL)

        def restored() -> bool:
            procs = server.processes()
            if "coordinator" not in procs or procs["coordinator"].pid == old.pid:
                return False
            try:
                entry = _listed(server).get(("linear", "1"))
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return entry is not None and entry["state"] == "ready" and entry["workers"] == [0]

        server.wait_for(restored, 60, "the restarted coordinator to restore linear:1")
        x = np.ones((1, 3), dtype=np.float32)
        r = c.post(
            "/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": x.tolist()}}
        )
        assert r.status_code == 200, r.text
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
        np.testing.assert_allclose(r.json()["outputs"][0]["scores"], expected["scores"][0], rtol=1e-6)
    finally:
        server.stop()
    assert server.shm_segments() == []
