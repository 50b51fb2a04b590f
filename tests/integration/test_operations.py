"""Operating the stack: scaling with supervisorctl, metrics, drain on SIGTERM, warm-up before ready."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import models
from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration

RECORDS = [{"feature1": 0.5, "feature2": -1.0}]


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    text = server.client.get("/metrics").text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def rows_by_worker(server: Server, model: str) -> dict[str, float]:
    """Rows each worker executed for ``model`` (from the batch-size histogram's sum)."""
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in samples(server).items()
        if name == "model_server_batch_size_rows_sum" and dict(labels).get("model") == model
    }


def infer(client: httpx.Client) -> httpx.Response:
    return client.post(
        "/v1/infer", json={"model_id": "fraud_detection", "model_version": "2.0.0", "inputs": RECORDS}
    )


def test_three_workers_scale_down_and_up_with_supervisorctl(repository: Path, tmp_path: Path) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text('- model_id: fraud_detection\n  version: "2.0.0"\n')
    server = Server(repository, workers=3, MODEL_SERVER_MODELS_FILE=models_file, MODEL_SERVER_SPARE_WORKERS=1)
    try:
        server.start()
        c = server.client
        procs = server.processes()
        assert {"worker-0", "worker-1", "worker-2"} <= set(procs) and "worker-3" not in procs
        assert len({procs[f"worker-{i}"].pid for i in range(3)}) == 3
        for _ in range(30):
            assert infer(c).status_code == 200
        served = rows_by_worker(server, "fraud_detection")
        assert {w for w, rows in served.items() if rows > 0} == {"0", "1", "2"}, served

        # Stop worker 1: the coordinator stops routing to it.
        out = server.ctl("stop", "worker:worker-1")
        assert "stopped" in out, out

        def without_1() -> bool:
            models = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
            return bool(models["fraud_detection"]["workers"] == [0, 2])

        server.wait_for(without_1, 20, "worker 1 to leave the table")
        before = rows_by_worker(server, "fraud_detection")
        for _ in range(30):
            assert infer(c).status_code == 200
        after = rows_by_worker(server, "fraud_detection")
        assert after["1"] == before["1"]
        assert after["0"] + after["2"] == before["0"] + before["2"] + 30

        # Add a worker at run time: it joins and is given the models.
        out = server.ctl("start", "spare-worker:worker-3")
        assert "started" in out, out

        def with_3() -> bool:
            models = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
            return 3 in models["fraud_detection"]["workers"]

        server.wait_for(with_3, 60, "worker 3 to hold the model")
        for _ in range(30):
            assert infer(c).status_code == 200
        assert rows_by_worker(server, "fraud_detection").get("3", 0) > 0
        metrics = samples(server)
        assert any(
            name == "model_server_worker_up" and dict(labels)["worker"] == "3" and value == 1
            for (name, labels), value in metrics.items()
        )
        assert any(
            name == "model_server_worker_up" and dict(labels)["worker"] == "1" and value == 0
            for (name, labels), value in metrics.items()
        )
    finally:
        server.stop()


def test_metrics_move_with_requests(repository: Path) -> None:
    server = Server(repository, workers=2)
    try:
        server.start()
        c = server.client
        assert c.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
        key = (
            "model_server_requests_total",
            (("model", "linear"), ("protocol", "v1"), ("status", "200"), ("version", "1")),
        )
        before = samples(server)
        x = np.ones((4, 3), dtype=np.float32)
        for _ in range(7):
            r = c.post(
                "/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": x.tolist()}}
            )
            assert r.status_code == 200
        bad = c.post("/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": [[1.0]]}})
        assert bad.status_code == 422
        v2 = c.post(
            "/v2/models/linear/infer",
            json={
                "inputs": [{"name": "x", "shape": [4, 3], "datatype": "FP32", "data": x.reshape(-1).tolist()}]
            },
        )
        assert v2.status_code == 200
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
        np.testing.assert_allclose(
            np.array(next(o["data"] for o in v2.json()["outputs"] if o["name"] == "scores")).reshape(4, 2),
            expected["scores"],
            rtol=1e-6,
        )
        after = samples(server)
        assert after[key] - before.get(key, 0) == 7
        failed = (
            "model_server_requests_total",
            (("model", "linear"), ("protocol", "v1"), ("status", "422"), ("version", "1")),
        )
        assert after[failed] - before.get(failed, 0) == 1
        v2key = (
            "model_server_requests_total",
            (("model", "linear"), ("protocol", "v2"), ("status", "200"), ("version", "1")),
        )
        assert after[v2key] == before.get(v2key, 0) + 1
        durations = [
            (key, value)
            for key, value in after.items()
            if key[0] == "model_server_request_duration_seconds_count"
            and dict(key[1]).get("model") == "linear"
            and dict(key[1]).get("protocol") == "v1"
        ]
        assert sum(v - before.get(k, 0) for k, v in durations) == 8
        rows = sum(
            v
            for (n, labels), v in after.items()
            if n == "model_server_batch_size_rows_sum" and dict(labels)["model"] == "linear"
        )
        assert rows == 8 * 4
        assert after[("model_server_models", (("state", "ready"),))] >= 1
        memory = [
            v
            for (n, labels), v in after.items()
            if n == "model_server_model_memory_bytes" and dict(labels)["model"] == "linear"
        ]
        assert memory and memory[0] > 0
        assert after[("model_server_inflight_requests", ())] == 0
        assert ("model_server_shm_bytes_in_use", ()) in after
        load = [
            v
            for (n, labels), v in after.items()
            if n == "model_server_model_load_duration_seconds_count" and dict(labels)["model"] == "linear"
        ]
        assert load == [1]
        ghost = c.post("/v1/models/load", json={"model_id": "ghost", "version": "1"})
        assert ghost.status_code == 404
        failures = samples(server)[("model_server_model_load_failures_total", (("reason", "not_found"),))]
        assert failures == 1
    finally:
        server.stop()


Outcome = tuple[str, str, float, float]  # (request id, outcome, sent at, answered at)


def _stream_slow_requests(
    server: Server,
    worker: int,
    x: list[list[float]],
    outcomes: list[Outcome],
    lock: threading.Lock,
    stop: threading.Event,
) -> None:
    """Send slow requests one after another until stopped or refused; record every outcome."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for n in range(300):
            if stop.is_set():
                return
            request_id = f"drain-{worker}-{n}"
            sent = time.monotonic()
            try:
                r = client.post(
                    "/v1/infer",
                    json={"model_id": "slow", "model_version": "1", "inputs": {"x": x}},
                    headers={"X-Request-ID": request_id},
                )
                code = r.json()["error"]["code"] if r.status_code == 503 else ""
                outcome = f"{r.status_code}:{code}" if code else str(r.status_code)
            except httpx.ConnectError:
                outcome = "refused"  # no listener any more: never accepted
            except httpx.HTTPError as exc:
                outcome = f"unanswered:{type(exc).__name__}"
            with lock:
                outcomes.append((request_id, outcome, sent, time.monotonic()))
            if outcome == "refused":
                return


def _assert_accepted_requests_answered(log: str, outcomes: list[Outcome]) -> None:
    """The access log has a line for every request the server took: each of those was answered."""
    taken = {line.split("[")[2].split("]")[0]: line for line in log.splitlines() if "POST /v1/infer" in line}
    for request_id, outcome, _, _ in outcomes:
        if outcome.startswith("unanswered"):
            assert request_id not in taken, (
                f"{request_id} was accepted but got no answer: {taken[request_id]}"
            )
        elif outcome != "refused":
            assert request_id in taken, (request_id, outcome)
    kinds = {o for _, o, _, _ in outcomes}
    assert kinds <= {"200", "503:draining", "refused"} | {k for k in kinds if k.startswith("unanswered")}, (
        kinds
    )
    assert "503:draining" in kinds  # new requests were refused while running ones finished


def test_sigterm_drains_without_losing_accepted_requests(repository: Path) -> None:
    """Every request the server accepted is answered: running ones with their result, new ones
    with 503 while draining. A request the server never read (its connection was still in a
    closing listener's backlog, or a keep-alive connection was being closed) is not "accepted":
    the access log, which has a line for every request the server took, proves which is which."""
    server = Server(repository, workers=2, MODEL_SERVER_DRAIN_SECONDS=20)
    try:
        server.start()
        loaded = server.client.post("/v1/models/load", json={"model_id": "slow", "version": "1"})
        assert loaded.status_code == 200
        x = (np.ones((8, 1024), dtype=np.float32) / 3).tolist()
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        stop = threading.Event()
        threads = [
            threading.Thread(target=_stream_slow_requests, args=(server, i, x, outcomes, lock, stop))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        server.wait_for(lambda: len(outcomes) >= 8, 60, "requests to flow")
        assert server.proc is not None
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        stop.set()
        for t in threads:
            t.join(60)
        _assert_accepted_requests_answered(server.log(), outcomes)
        # Requests running when SIGTERM came were answered, after it, with their results.
        finished_after = [o for _, o, sent, done in outcomes if sent < sigterm_at < done]
        assert finished_after and all(o in {"200", "503:draining"} for o in finished_after), finished_after
        assert "200" in finished_after
        assert server.proc.returncode == 0
        assert server.shm_segments() == []
    finally:
        server.stop()


def test_ready_waits_for_warm_up_of_start_up_models(repository: Path, tmp_path: Path) -> None:
    """A start-up model that is not there yet keeps /ready at 503; it is retried, and once it
    appears, /ready turns 200 only with every start-up model loaded *and* warmed."""
    late = f"late{tmp_path.name[-6:].replace('_', '')}"
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        f'models:\n  - {{model_id: slow, version: "1"}}\n  - {{model_id: {late}, version: "1"}}\n'
    )
    server = Server(repository, workers=1, MODEL_SERVER_MODELS_FILE=models_file)
    try:
        server.start(wait_ready=False)
        c = server.client

        def failed_once() -> bool:
            models = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
            return bool(models.get(late, {}).get("state") == "failed")

        server.wait_for(failed_once, 60, "the missing start-up model to fail")
        r = c.get("/ready")
        assert r.status_code == 503 and any(late in reason for reason in r.json()["reasons"])
        assert "retry" in {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}[late]["reason"]
        models.linear(repository / late / "1" / "model.onnx", features=3, seed=11)
        server.wait_for(
            lambda: c.get("/ready").status_code == 200, 60, "the retried model to make /ready 200"
        )
        listed = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
        # Ready means loaded *and* warmed on a worker.
        assert listed["slow"]["state"] == "ready" and listed["slow"]["warmup_ms"] > 0
        assert listed[late]["state"] == "ready" and listed[late]["warmup_ms"] > 0
        assert "warmed in" in server.log() and f"retrying start-up model {late}:1" in server.log()
        x = np.ones((2, 3), dtype=np.float32)
        r = c.post("/v1/infer", json={"model_id": late, "inputs": {"x": x.tolist()}})
        expected = ort_run(repository / late / "1" / "model.onnx", {"x": x})
        np.testing.assert_allclose([o["scores"] for o in r.json()["outputs"]], expected["scores"], rtol=1e-6)
    finally:
        server.stop()
