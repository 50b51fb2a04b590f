"""Worker death, restart and model replay; readiness; nothing left in /dev/shm after shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when the series does not exist yet)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


def _stop(proc: psutil.Process) -> None:
    """SIGSTOP, and wait until the kernel reports the process stopped (bounded)."""
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while proc.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.005)


# A batch queue that holds a lone request for seconds: the request provably waits inside
# the worker (its queued-requests gauge says so) with no reply sent, whatever the CPU speed.
HOLD = {"max_batch_size": 256, "preferred_batch_sizes": [256], "max_queue_delay_us": 3_000_000}


def _slow_batches_run(c: httpx.Client) -> float:
    return _metric(c.get("/metrics").text, "model_server_batch_size_rows_count", model="slow", version="1")


def _kill_while_queued(c: httpx.Client, worker: psutil.Process, ran_before: float) -> None:
    """SIGKILL ``worker`` once it holds the slow request queued and has not run it.

    Judged while the worker is stopped, so nothing changes between the look and the kill:
    queued >= 1 means the worker took the request off its socket; an unchanged batch count
    means it has not run it (the count is written before any reply is sent). Killed then,
    the request cannot have been answered.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _stop(worker)
        text = c.get("/metrics").text
        queued = _metric(text, "model_server_queued_requests")
        ran = _metric(text, "model_server_batch_size_rows_count", model="slow", version="1")
        if queued >= 1 and ran == ran_before:
            os.kill(worker.pid, signal.SIGKILL)
            return
        os.kill(worker.pid, signal.SIGCONT)
        assert ran == ran_before, "the request ran before it was seen queued in the worker"
        time.sleep(0.02)
    pytest.fail("the request never reached the worker")


def _wait_for_models_back(server: Server, old: psutil.Process) -> None:
    """supervisord starts a new worker; the coordinator gives it the models back."""

    def back() -> bool:
        procs = server.processes()
        if "worker-0" not in procs or procs["worker-0"].pid == old.pid:
            return False
        listed = {m["model_id"]: m for m in server.client.get("/v1/models").json()["models"]}
        return bool(listed["linear"]["workers"] == [0] and listed["slow"]["workers"] == [0])

    server.wait_for(back, 60, "the restarted worker to hold its models")


def test_killed_worker_fails_in_flight_fast_restarts_and_gets_models_back(repository: Path) -> None:
    server = Server(repository, workers=1)
    try:
        server.start()
        c = server.client
        r = c.post("/v1/models/load", json={"model_id": "slow", "version": "1", **HOLD})
        assert r.status_code == 200, r.text
        assert c.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
        old = server.processes()["worker-0"]
        x = (np.ones((4, 1024), dtype=np.float32) / 3).tolist()
        result: dict[str, httpx.Response] = {}

        def slow_request() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as other:
                result["r"] = other.post(
                    "/v1/infer", json={"model_id": "slow", "model_version": "1", "inputs": {"x": x}}
                )

        ran_before = _slow_batches_run(c)
        thread = threading.Thread(target=slow_request)
        thread.start()
        _kill_while_queued(c, old, ran_before)
        thread.join(60)
        assert not thread.is_alive()
        r = result["r"]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "worker_died"

        # While the only worker is down, requests are refused with 503, never left hanging.
        during = c.post(
            "/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": [[1, 2, 3]]}}
        )
        assert during.status_code in (200, 503), during.text

        _wait_for_models_back(server, old)
        features = np.array([[0.5, 1.0, -2.0]], dtype=np.float32)
        again = c.post(
            "/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": features.tolist()}}
        )
        assert again.status_code == 200, again.text
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": features})
        np.testing.assert_allclose(again.json()["outputs"][0]["scores"], expected["scores"][0], rtol=1e-6)
        assert "exited while serving" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert server.shm_segments() == []


def test_ready_waits_for_start_up_models_and_shm_is_released(repository: Path, tmp_path: Path) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  - model_id: fraud_detection\n    version: '2.0.0'\n"
        "  - model_id: absent\n    version: '1'\n"
    )
    server = Server(repository, workers=1, MODEL_SERVER_MODELS_FILE=models_file)
    try:
        server.start(wait_ready=False)
        c = server.client

        def failed_listed() -> bool:
            models = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
            return bool(models.get("absent", {}).get("state") == "failed")

        server.wait_for(failed_listed, 60, "the missing start-up model to fail")
        ready = c.get("/ready")
        assert ready.status_code == 503
        reasons = " ".join(ready.json()["reasons"])
        assert "absent:1" in reasons and "failed" in reasons
        assert c.get("/health").status_code == 200
        # The healthy start-up model serves anyway.
        r = c.post(
            "/v1/infer",
            json={
                "model_id": "fraud_detection",
                "model_version": "2.0.0",
                "inputs": [{"feature1": 1, "feature2": 0}],
            },
        )
        assert r.status_code == 200
        assert server.shm_segments(), "the frontend's arena lives in /dev/shm while it runs"
        # Unloading the broken start-up model leaves nothing to wait for.
        assert c.delete("/v1/models/absent/1").status_code == 200
        server.wait_for(lambda: c.get("/ready").status_code == 200, 20, "ready after the unload")
        run_dir = server.run_dir
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]
    assert server.shm_segments() == []
    assert not list(run_dir.glob("*.ipc"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "stopped: coordinator" not in server.log():
        time.sleep(0.1)
    assert "stopped: coordinator (exit status 0)" in server.log()


def test_worker_recycles_when_memory_stays_high_after_an_unload(repository: Path) -> None:
    """MODEL_SERVER_WORKER_RECYCLE_RSS_BYTES: a worker still above the mark after an unload exits
    with RECYCLE; supervisord starts a new one and the coordinator gives it the remaining models."""
    server = Server(repository, workers=1, MODEL_SERVER_WORKER_RECYCLE_RSS_BYTES=1)  # any RSS is above
    try:
        server.start()
        c = server.client
        for version in ("1", "2"):
            assert (
                c.post("/v1/models/load", json={"model_id": "linear", "version": version}).status_code == 200
            )
        old = server.processes()["worker-0"]
        assert c.delete("/v1/models/linear/1").status_code == 200

        def replaced() -> bool:
            procs = server.processes()
            if "worker-0" not in procs or procs["worker-0"].pid == old.pid:
                return False
            listed = {(m["model_id"], m["version"]): m for m in c.get("/v1/models").json()["models"]}
            return bool(listed[("linear", "2")]["workers"] == [0])

        server.wait_for(replaced, 60, "the recycled worker to come back with linear:2")
        assert "recycling" in server.log()
        assert "exit status 10" in server.log()  # exitcodes.RECYCLE, restarted as unexpected
        x = np.ones((2, 3), dtype=np.float32)
        r = c.post(
            "/v1/infer", json={"model_id": "linear", "model_version": "2", "inputs": {"x": x.tolist()}}
        )
        assert r.status_code == 200, r.text
        expected = ort_run(repository / "linear" / "2" / "model.onnx", {"x": x})
        np.testing.assert_allclose([o["scores"] for o in r.json()["outputs"]], expected["scores"], rtol=1e-6)
    finally:
        server.stop()


def test_a_worker_that_cannot_boot_is_not_restarted_in_a_loop(repository: Path) -> None:
    """A bad device setting: each worker says why and exits with BOOT_ERROR (3), which
    supervisord treats as expected, so it stays stopped instead of restarting in a loop."""
    server = Server(repository, workers=2, MODEL_SERVER_GPUS="7")
    try:
        server.start(wait_ready=False)
        server.wait_for(
            lambda: server.log().count("exit status 3; expected") >= 2, 60, "both workers to stop"
        )
        log = server.log()
        assert "GPU(s) [7] configured but 0 GPU(s) found" in log and "MODEL_SERVER_GPUS" in log
        assert log.count("spawned: 'worker-0'") == 1  # not restarted
        ready = server.client.get("/ready")
        assert ready.status_code == 503 and "no worker is alive" in ready.json()["reasons"]
        assert "RUNNING" in server.ctl("status", "coordinator") and "EXITED" in server.ctl(
            "status", "worker:*"
        )
    finally:
        server.stop()
