"""Dynamic batching on the real stack: a burst of one-row requests is executed in batches that fill.

With ``MODEL_SERVER_MAX_QUEUE_DELAY_US=0`` a batcher that cuts batches from what
arrived within its delay window runs every request alone. The worker drains its
socket before cutting, so requests that queued up while it was busy run together:
the worker's batch-size histogram shows batches of more than one row, and every
output still equals an in-test onnxruntime run of that request alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration

MODEL = "slow"  # 200 MatMuls of 1024 x 1024: tens of ms a row, so a backlog forms behind a run
MAX_BATCH = 16
BURST = 16
BLOCKER_ROWS = 2 * MAX_BATCH  # over the cap: runs alone, and long, while the burst queues
WIDTH = 1024


@pytest.fixture(scope="module")
def batching_server(repository: Path) -> Iterator[Server]:
    srv = Server(repository, workers=1, MODEL_SERVER_MAX_QUEUE_DELAY_US=0)
    try:
        srv.start()
        loaded = srv.client.post(
            "/v1/models/load", json={"model_id": MODEL, "version": "1", "max_batch_size": MAX_BATCH}
        )
        assert loaded.status_code == 200, loaded.text
        yield srv
    finally:
        srv.stop()


def batch_histogram(server: Server) -> dict[str, float]:
    """The worker's ``model_server_batch_size_rows`` for MODEL: bucket bounds, count and sum."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(server.client.get("/metrics").text):
        for s in family.samples:
            if not s.name.startswith("model_server_batch_size_rows") or s.labels.get("model") != MODEL:
                continue
            key = s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]
            out[key] = out.get(key, 0.0) + s.value
    return out


def v2_infer(client: httpx.Client, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = client.post(f"/v2/models/{MODEL}/versions/1/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_burst_of_one_row_requests_runs_in_batches_that_fill(
    batching_server: Server, repository: Path
) -> None:
    rng = np.random.default_rng(12)
    blocker = rng.standard_normal((BLOCKER_ROWS, WIDTH)).astype(np.float32)
    xs = [rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(BURST)]
    before = batch_histogram(batching_server)
    results: dict[int, np.ndarray[Any, Any]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def send(i: int, x: np.ndarray[Any, Any]) -> None:
        try:
            with httpx.Client(base_url=batching_server.url) as client:
                y = v2_infer(client, x)
            with lock:
                results[i] = y
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)

    # The blocker keeps the only worker busy while the burst arrives behind it.
    threads = [threading.Thread(target=send, args=(-1, blocker))]
    threads += [threading.Thread(target=send, args=(i, x)) for i, x in enumerate(xs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "requests still running after 180 s"
    assert not errors, errors

    path = repository / MODEL / "1" / "model.onnx"
    np.testing.assert_allclose(results[-1], ort_run(path, {"x": blocker})["y"], rtol=1e-5, atol=1e-6)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], ort_run(path, {"x": x})["y"], rtol=1e-5, atol=1e-6)

    after = batch_histogram(batching_server)
    batches = after["count"] - before.get("count", 0)
    rows = after["sum"] - before.get("sum", 0)
    single_row = after["1.0"] - before.get("1.0", 0)
    assert rows == BLOCKER_ROWS + BURST, "every row executed exactly once"
    # With no delay window, cutting batches from arrivals alone gives BURST one-row batches;
    # draining the backlog first merges the requests that queued behind the blocker.
    assert batches - 1 < BURST, f"{batches - 1} batches for {BURST} one-row requests"
    assert single_row < BURST, "no batch of the burst had more than one row"
