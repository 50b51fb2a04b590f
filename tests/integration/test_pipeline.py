"""The real process topology serving the seed's v1 API, checked against onnxruntime."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration

SEED_RECORDS = [{"feature1": 1.0, "feature2": 2.0}, {"feature1": 3.0, "feature2": 4.0}]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_roles_run_in_separate_processes(server: Server) -> None:
    procs = server.processes()
    assert {"coordinator", "worker-0", "worker-1", "frontend-0"} <= set(procs)
    pids = {name: p.pid for name, p in procs.items()}
    assert len(set(pids.values())) == len(pids)
    frontend = pids["frontend-0"]
    assert frontend not in {pids["worker-0"], pids["worker-1"], pids["coordinator"]}
    # The frontend never loads ONNX Runtime; the workers do.
    assert "onnxruntime" not in _maps(frontend)
    assert "onnxruntime" in _maps(pids["worker-0"])
    listed = server.client.get("/v1/models").json()["models"]
    demo = next(m for m in listed if m["model_id"] == "fraud_detection")
    assert sorted(demo["workers"]) == [0, 1]


def test_seed_examples_load_list_infer_unload(server: Server, repository: Path) -> None:
    c = server.client
    loaded = c.post("/v1/models/load", json={"model_id": "linear", "version": "1"})
    assert loaded.status_code == 200, loaded.text
    entry = loaded.json()
    assert entry["state"] == "ready"
    assert entry["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert entry["feature_names"] == ["f0", "f1", "f2"]
    assert entry["memory_bytes"] > 0 and entry["load_ms"] > 0 and entry["loaded_at"] > 0
    listed = {(m["model_id"], m["version"]): m for m in c.get("/v1/models").json()["models"]}
    assert listed[("linear", "1")]["state"] == "ready"

    records: list[dict[str, float]] = [
        {"f0": 0.5, "f1": -1.0, "f2": 2.0},
        {"f0": 1.5, "f1": 0.0, "f2": -3.0},
        {"f0": 0, "f1": 1, "f2": 1},
    ]
    response = c.post("/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == "linear" and body["model_version"] == "1"
    assert body["request_id"] == response.headers["x-request-id"]
    x = np.array([[r["f0"], r["f1"], r["f2"]] for r in records], dtype=np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    assert len(body["outputs"]) == len(records)
    np.testing.assert_allclose([o["scores"] for o in body["outputs"]], expected["scores"], rtol=1e-6)
    assert [o["label"] for o in body["outputs"]] == expected["label"].tolist()

    unloaded = c.delete("/v1/models/linear/1")
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
    gone = c.post("/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": records})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"
    assert c.delete("/v1/models/linear/1").status_code == 404


def test_seed_infer_on_demo_model(server: Server, repository: Path) -> None:
    response = server.client.post(
        "/v1/infer", json={"model_id": "fraud_detection", "model_version": "2.0.0", "inputs": SEED_RECORDS}
    )
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    feeds = {
        "feature1": np.array([[1.0], [3.0]], dtype=np.float32),
        "feature2": np.array([[2.0], [4.0]], dtype=np.float32),
    }
    expected = ort_run(repository / "fraud_detection" / "2.0.0" / "model.onnx", feeds)
    np.testing.assert_allclose([o["fraud_probability"] for o in outputs], expected["fraud_probability"][:, 0])
    assert [o["is_fraud"] for o in outputs] == expected["is_fraud"][:, 0].tolist()


def test_sklearn_records_by_feature_names(server: Server, repository: Path) -> None:
    path = repository / "credit" / "1"
    loaded = server.client.post(
        "/v1/models/load", json={"model_id": "credit", "version": "1", "registry_uri": str(path)}
    )
    assert loaded.status_code == 200, loaded.text
    rng = np.random.default_rng(3)
    x = rng.normal(size=(17, 3)).astype(np.float32)
    # Fields in another order than the model's columns: the metadata decides the order.
    records = [{"score": float(r[2]), "amount": float(r[0]), "age": float(r[1])} for r in x]
    response = server.client.post(
        "/v1/infer", json={"model_id": "credit", "model_version": "1", "inputs": records}
    )
    assert response.status_code == 200, response.text
    expected = ort_run(path / "model.onnx", {next(iter(_input_names(path))): x})
    outputs = response.json()["outputs"]
    assert [o["label"] for o in outputs] == expected["label"].tolist()
    np.testing.assert_allclose([o["probabilities"] for o in outputs], expected["probabilities"], rtol=1e-6)


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path / "model.onnx")).graph.input]


def test_named_tensors_and_version_default(server: Server, repository: Path) -> None:
    for version in ("1", "2"):
        assert (
            server.client.post("/v1/models/load", json={"model_id": "linear", "version": version}).status_code
            == 200
        )
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    # No model_version: the newest ready version (2) serves.
    response = server.client.post("/v1/infer", json={"model_id": "linear", "inputs": {"x": x.tolist()}})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "2"
    expected = ort_run(repository / "linear" / "2" / "model.onnx", {"x": x})
    np.testing.assert_allclose(
        [o["scores"] for o in response.json()["outputs"]], expected["scores"], rtol=1e-6
    )
    only = server.client.post(
        "/v1/infer",
        json={"model_id": "linear", "model_version": "1", "inputs": {"x": x.tolist()}, "outputs": ["label"]},
    )
    assert only.status_code == 200
    assert all(set(o) == {"label"} for o in only.json()["outputs"])
    assert [o["label"] for o in only.json()["outputs"]] == ort_run(
        repository / "linear" / "1" / "model.onnx", {"x": x}
    )["label"].tolist()


def test_records_of_several_types(server: Server, repository: Path) -> None:
    assert (
        server.client.post("/v1/models/load", json={"model_id": "multi", "version": "1"}).status_code == 200
    )
    records = [
        {"count": 3, "amount": 2.5, "flag": True, "tag": "alpha"},
        {"count": -2, "amount": 0.25, "flag": False, "tag": "beta é"},
    ]
    response = server.client.post(
        "/v1/infer", json={"model_id": "multi", "model_version": "1", "inputs": records}
    )
    assert response.status_code == 200, response.text
    feeds = {
        "count": np.array([[3], [-2]], dtype=np.int64),
        "amount": np.array([[2.5], [0.25]], dtype=np.float32),
        "flag": np.array([[True], [False]]),
        "tag": np.array([["alpha"], ["beta é"]], dtype=object),
    }
    expected = ort_run(repository / "multi" / "1" / "model.onnx", feeds)
    outputs = response.json()["outputs"]
    np.testing.assert_allclose([o["total"] for o in outputs], expected["total"][:, 0])
    assert [o["not_flag"] for o in outputs] == expected["not_flag"][:, 0].tolist()
    assert [o["tag_out"] for o in outputs] == list(expected["tag_out"][:, 0])


def test_outputs_larger_than_the_estimate_spill_and_are_cleaned(server: Server, repository: Path) -> None:
    assert (
        server.client.post("/v1/models/load", json={"model_id": "expand", "version": "1"}).status_code == 200
    )
    before = server.shm_segments()
    x = np.array([[1.5], [-2.0], [0.25]], dtype=np.float32)
    shape = [3, 40_000]  # 480 KB of output: more than the frontend can foresee
    response = server.client.post(
        "/v1/infer",
        json={"model_id": "expand", "model_version": "1", "inputs": {"x": x.tolist(), "shape": shape}},
    )
    assert response.status_code == 200, response.text
    expected = ort_run(repository / "expand" / "1" / "model.onnx", {"x": x, "shape": np.array(shape)})
    got = np.array([o["y"] for o in response.json()["outputs"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected["y"])
    assert server.shm_segments() == before  # the spill segment was unlinked


def test_error_statuses_and_shape(server: Server, repository: Path, tmp_path: Path) -> None:
    c = server.client
    missing = c.post(
        "/v1/infer",
        json={"model_id": "nope", "model_version": "1", "inputs": SEED_RECORDS},
        headers={"X-Request-ID": "req-404-check"},
    )
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] == "req-404-check"
    error = missing.json()["error"]
    assert set(error) == {"code", "message", "request_id", "details"}
    assert error["request_id"] == "req-404-check" and error["code"] == "model_not_found"

    def infer(inputs: object) -> httpx.Response:
        return c.post(
            "/v1/infer", json={"model_id": "fraud_detection", "model_version": "2.0.0", "inputs": inputs}
        )

    r = infer([{"feature1": 1.0}])
    assert r.status_code == 422 and "feature2" in r.json()["error"]["message"]
    assert r.json()["error"]["details"]["missing"] == ["feature2"]
    r = infer([{"feature1": 1.0, "feature2": 2.0, "feature3": 0.0}])
    assert r.status_code == 422 and "feature3" in r.json()["error"]["message"]
    r = infer([{"feature1": "high", "feature2": 2.0}])
    assert r.status_code == 422 and "feature1" in r.json()["error"]["message"]
    r = infer({"feature1": [[1.0, 2.0]], "feature2": [[1.0]]})
    assert r.status_code == 422 and "shape" in r.json()["error"]["message"]
    r = infer([])  # no records: a zero-row batch, answered with zero output records (issue 10)
    assert r.status_code == 200 and r.json()["outputs"] == []
    r = c.post("/v1/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
    r = c.post("/v1/infer", json={"model_version": "1", "inputs": SEED_RECORDS})
    assert r.status_code == 422 and "model_id" in r.json()["error"]["message"]

    big = [{"feature1": 1.0, "feature2": 2.0}] * 100_000  # > MODEL_SERVER_MAX_REQUEST_BYTES (2 MiB)
    r = infer(big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    r = c.post(
        "/v1/models/load",
        json={"model_id": "ghost", "version": "1", "registry_uri": str(tmp_path / "nothing")},
    )
    assert r.status_code == 404, r.text
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    r = c.post("/v1/models/load", json={"model_id": "garbage", "version": "1", "registry_uri": str(garbage)})
    assert r.status_code == 422, r.text
    assert "ONNX" in r.json()["error"]["message"]
    r = c.post("/v1/models/load", json={"model_id": "../etc", "version": "1"})
    assert r.status_code == 422
    failed = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}["garbage"]
    assert failed["state"] == "failed" and failed["reason"]
    r = infer(SEED_RECORDS)
    assert r.status_code == 200  # the server keeps serving


def test_deadline_unload_waits_and_not_ready(server: Server, repository: Path) -> None:
    c = server.client
    assert c.post("/v1/models/load", json={"model_id": "slow", "version": "1"}).status_code == 200
    x = (np.ones((64, 1024), dtype=np.float32) / 3).tolist()
    timed_out = c.post(
        "/v1/infer", json={"model_id": "slow", "model_version": "1", "inputs": {"x": x}, "timeout_ms": 50}
    )
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.json()["error"]["code"] == "deadline_exceeded"

    # The request in flight during the unload must outlast the polling below by a wide margin:
    # 64 rows run in ~0.4 s, so it could finish (and the unload complete, answering 404) before the
    # refused request was sent. 320 rows of ones run ~2 s on one core and stay a ~1 MB body.
    running = np.ones((320, 1024), dtype=np.float32).tolist()
    results: dict[str, httpx.Response] = {}

    def run() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as other:
            results["infer"] = other.post(
                "/v1/infer", json={"model_id": "slow", "model_version": "1", "inputs": {"x": running}}
            )

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)  # let it reach a worker
    unloading: dict[str, httpx.Response] = {}

    def unload() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as other:
            unloading["r"] = other.delete("/v1/models/slow/1")

    remover = threading.Thread(target=unload)
    remover.start()
    deadline = time.monotonic() + 20
    state = ""
    while time.monotonic() < deadline and state != "unloading" and remover.is_alive():
        models = {m["model_id"]: m for m in c.get("/v1/models").json()["models"]}
        state = models.get("slow", {}).get("state", "")
        time.sleep(0.02)
    assert state == "unloading", state
    refused = c.post("/v1/infer", json={"model_id": "slow", "model_version": "1", "inputs": {"x": x[:1]}})
    assert "infer" not in results  # still running: the unload cannot have finished
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_unloading"
    worker.join(60)
    remover.join(60)
    # The request that was running when the unload began finished normally.
    assert results["infer"].status_code == 200, results["infer"].text
    assert unloading["r"].status_code == 200
    expected = ort_run(repository / "slow" / "1" / "model.onnx", {"x": np.array(running, dtype=np.float32)})
    np.testing.assert_allclose(
        np.array([o["y"] for o in results["infer"].json()["outputs"]]), expected["y"], rtol=1e-5
    )


def test_concurrent_loads_share_one_load(server: Server) -> None:
    def load() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as other:
            return other.post("/v1/models/load", json={"model_id": "credit", "version": "1"})

    server.client.delete("/v1/models/credit/1")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: load(), range(6)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["loaded_at"] for r in responses}) == 1
    assert server.log().count("loading credit:1 from") == 2  # once in the earlier test, once here


def test_request_id_reaches_the_worker_log(server: Server) -> None:
    assert (
        server.client.post("/v1/models/load", json={"model_id": "expand", "version": "1"}).status_code == 200
    )
    bad_shape = {"x": [[1.0], [2.0]], "shape": [3, 2]}  # 2 rows cannot broadcast to 3: ONNX Runtime refuses
    r = server.client.post(
        "/v1/infer",
        json={"model_id": "expand", "model_version": "1", "inputs": bad_shape},
        headers={"X-Request-ID": "trace-worker-7781"},
    )
    assert r.status_code == 422, r.text

    def lines() -> list[str]:
        return [line for line in server.log().splitlines() if "trace-worker-7781" in line]

    server.wait_for(lambda: len(lines()) >= 2, 10, "the request's log lines")
    assert any("[worker-" in line and "invalid expand shape" in line for line in lines()), lines()
    assert any("[frontend:" in line and "POST /v1/infer 422" in line for line in lines()), lines()


def test_docs_and_cors(server: Server) -> None:
    c = server.client
    spec = c.get("/openapi.json").json()
    for path in (
        "/health",
        "/ready",
        "/v1/models/load",
        "/v1/models",
        "/v1/models/{model_id}/{version}",
        "/v1/infer",
    ):
        assert path in spec["paths"], path
    infer = spec["paths"]["/v1/infer"]["post"]
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"404", "422", "503", "504"} <= set(infer["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert c.get("/docs").status_code == 200 and c.get("/redoc").status_code == 200
    preflight = c.options(
        "/v1/infer",
        headers={"Origin": "http://app.example.test", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers.get("access-control-allow-origin") == "http://app.example.test"
    assert c.get("/health").json() == {"status": "ok"}
    ready = c.get("/ready").json()
    assert ready["ready"] is True and ready["workers"] == 2
