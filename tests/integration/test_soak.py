"""Soak: a model loaded and unloaded 100 times while inferences run against it.

What may go wrong over many cycles and not over one: sessions or mappings that
leak (worker RSS grows), segments left in /dev/shm, a request caught in an
unload window answered with something the API does not document, or a wrong
answer from a session that outlived its model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.models import ort_run

from .server import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = 100
MAX_INFERENCES = 20_000  # the background thread's bound in count; it also stops with the cycles
RSS_TOLERANCE = 0.10
MODEL = {"model_id": "linear", "version": "1"}
# What a request may meet while its model is unloaded or loaded under it, as documented:
# gone (404), being unloaded (409), not ready yet (503 with Retry-After while it loads).
WINDOW_ERRORS = {(404, "model_not_found"), (409, "model_unloading"), (503, "model_not_ready")}


def _workers_rss(server: Server) -> dict[str, int]:
    return {
        name: proc.memory_info().rss for name, proc in server.processes().items() if name.startswith("worker")
    }


class Traffic:
    """Inferences in a background thread, each answer judged: right, a documented window, or not."""

    def __init__(self, url: str, body: dict[str, Any], expected: dict[str, Any]) -> None:
        self.url = url
        self.body = body
        self.expected = expected
        self.stop = threading.Event()
        self.answers: dict[str, int] = {"ok": 0, "window": 0}
        self.unexpected: list[str] = []
        self.wrong: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def check(self, outputs: list[dict[str, Any]], where: str) -> None:
        for row, out in enumerate(outputs):
            for name, value in out.items():
                if not np.allclose(value, self.expected[name][row], rtol=1e-5, atol=1e-6):
                    self.wrong.append(f"{where}: {name}[{row}]: {value} != {self.expected[name][row]}")

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(MAX_INFERENCES):
                if self.stop.is_set():
                    return
                try:
                    r = client.post("/v1/infer", json=self.body)
                    payload = r.json()
                except (httpx.HTTPError, ValueError) as exc:  # recorded, not lost with the thread
                    self.unexpected.append(repr(exc))
                    continue
                self._judge(r, payload)

    def _judge(self, r: httpx.Response, payload: Any) -> None:
        if r.status_code == 200:
            self.answers["ok"] += 1
            self.check(payload["outputs"], "background")
            return
        code = payload.get("error", {}).get("code", "")
        if (r.status_code, code) in WINDOW_ERRORS:
            self.answers["window"] += 1
            time.sleep(0.005)  # what Retry-After asks for, shortened: keep the windows probed
        else:
            self.unexpected.append(f"{r.status_code} {r.text[:300]}")

    def finish(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(60)


def _load_infer_unload(c: httpx.Client, traffic: Traffic, cycle: int) -> None:
    r = c.post("/v1/models/load", json=MODEL)
    assert r.status_code == 200, f"cycle {cycle}: {r.text}"
    assert r.json()["state"] == "ready"
    # Loaded and not yet unloaded (only this thread unloads): it must answer, and right.
    r = c.post("/v1/infer", json=traffic.body)
    assert r.status_code == 200, f"cycle {cycle}: {r.text}"
    traffic.check(r.json()["outputs"], f"cycle {cycle}")
    r = c.delete("/v1/models/linear/1")
    assert r.status_code == 200, f"cycle {cycle}: {r.text}"


def _assert_gone_then_serves_again(c: httpx.Client, traffic: Traffic) -> None:
    """The model is gone everywhere, and a final load serves the same answers."""
    assert c.get("/v1/models/linear/1").status_code == 404
    assert c.post("/v1/models/load", json=MODEL).status_code == 200
    final = c.post("/v1/infer", json=traffic.body)
    assert final.status_code == 200, final.text
    for row, out in enumerate(final.json()["outputs"]):
        for name, value in out.items():
            np.testing.assert_allclose(value, traffic.expected[name][row], rtol=1e-5, atol=1e-6)


def _worker_pids(server: Server) -> dict[str, int]:
    return {name: proc.pid for name, proc in server.processes().items() if name.startswith("worker")}


def test_load_unload_cycles_under_inference_leak_nothing(repository: Path) -> None:
    server = Server(repository, workers=2)
    features = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": features})
    body = {"model_id": "linear", "model_version": "1", "inputs": {"x": features.tolist()}}
    traffic = Traffic(server.url, body, expected)
    try:
        server.start()
        c = server.client
        before = _worker_pids(server)
        traffic.thread.start()
        first_rss: dict[str, int] = {}
        for cycle in range(CYCLES):
            _load_infer_unload(c, traffic, cycle)
            if cycle == 0:
                first_rss = _workers_rss(server)
        traffic.finish()
        assert not traffic.thread.is_alive()
        last_rss = _workers_rss(server)

        assert traffic.unexpected == [], traffic.unexpected[:5]
        assert traffic.wrong == [], traffic.wrong[:5]
        # No worker died on the way (a restart would also reset its RSS).
        assert _worker_pids(server) == before
        for name, rss in last_rss.items():
            assert rss <= first_rss[name] * (1 + RSS_TOLERANCE), (name, first_rss[name], rss)
        _assert_gone_then_serves_again(c, traffic)
    finally:
        traffic.finish()
        server.stop()
    assert server.shm_segments() == []
