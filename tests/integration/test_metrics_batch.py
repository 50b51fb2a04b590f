"""Request counts written in batches stay exact across frontend processes (real stack).

Each frontend keeps its request metrics in memory and writes them at most
``MODEL_SERVER_METRICS_FLUSH_INTERVAL_S`` later; a frontend serving /metrics or
statistics writes its own and waits for the others' counts of requests answered
before the read. Requests spread over both frontends (a fresh connection each), with
an interval long enough that the other frontend's timer has not fired when the
read comes: /metrics and the statistics extension still show exactly the number sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration

FLUSH_S = 2.0  # longer than the test's requests take: the read must wait for the other's flush
MIN_REQUESTS, MAX_REQUESTS = 16, 64


@pytest.fixture(scope="module")
def two_frontends(repository: Path) -> Iterator[Server]:
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_FRONTEND_PROCESSES=2,
        MODEL_SERVER_METRICS_FLUSH_INTERVAL_S=FLUSH_S,
    )
    try:
        srv.start()
        assert (
            srv.client.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
        )
        yield srv
    finally:
        srv.stop()


def _count(url: str) -> tuple[float, int]:
    """(requests counted in /metrics, successes in the statistics) for linear:1 over V2, 200."""
    with httpx.Client(base_url=url, timeout=30) as client:  # a fresh connection: either frontend
        text = client.get("/metrics").text
        stats = client.get("/v2/models/linear/versions/1/stats").json()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "model_server_requests_total"
                and (labels.get("model"), labels.get("version"), labels.get("protocol"))
                == ("linear", "1", "v2")
                and labels.get("status") == "200"
            ):
                total += sample.value
    return total, stats["model_stats"][0]["inference_stats"]["success"]["count"]


def test_counts_are_exact_across_frontends_within_the_flush_interval(
    two_frontends: Server, repository: Path
) -> None:
    url = two_frontends.url
    before, before_stats = _count(url)
    rng = np.random.default_rng(3)
    frontends: set[str] = set()
    sent = 0
    while sent < MAX_REQUESTS and (sent < MIN_REQUESTS or len(frontends) < 2):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()}]}
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.post("/v2/models/linear/versions/1/infer", json=body)
        assert response.status_code == 200, response.text
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
        got = next(o for o in response.json()["outputs"] if o["name"] == "scores")
        np.testing.assert_allclose(np.array(got["data"]).reshape(2, 2), expected["scores"], rtol=1e-6)
        # Generated request ids start with a random prefix per frontend process.
        frontends.add(response.headers["x-request-id"][:12])
        sent += 1
    assert len(frontends) == 2, "every request went to one frontend"

    assert _count(url) == (before + sent, before_stats + sent)
    # And they stay there: no later flush counts anything twice.
    time.sleep(FLUSH_S * 1.5)
    assert _count(url) == (before + sent, before_stats + sent)
