"""No request can kill a worker, and client shared memory is safe to use (issue 10, items 1 and 2).

The real stack, attacked as the issue did: zero-row tensors on every protocol, requests
that make onnxruntime (or the worker's encoding) raise, client regions truncated or
swapped for a directory or a symlink after registration, and registrations that are too
many, too long or mistyped. After each, the workers are the same processes (no restart)
and the demo model still answers what onnxruntime answers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
import tritonclient.utils.shared_memory as shm

from ipc.arena import SHM_DIR
from model_server import demo
from tests import fault_models, models
from tests.models import ort_run

from .regions import client_region
from .server import Server

pytestmark = pytest.mark.integration

FRAUD = ("fraud_detection", "2.0.0")
MAX_REGIONS = 4
MAX_REQUEST_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("containment-repo")
    demo.write(root)
    models.linear(root / "linear" / "1" / "model.onnx", features=3)
    models.multi_dtype(root / "multi" / "1" / "model.onnx")
    fault_models.lookup(root / "lookup" / "1" / "model.onnx")
    fault_models.sequence(root / "sequence" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def srv(repo: Path) -> Iterator[Server]:
    server = Server(
        repo,
        workers=2,
        MODEL_SERVER_ALLOW_CLIENT_SHM="true",
        MODEL_SERVER_MAX_SHM_REGIONS=MAX_REGIONS,
        # Small enough that a region input over it stays under MODEL_SERVER_MAX_ROWS_PER_REQUEST.
        MODEL_SERVER_MAX_REQUEST_BYTES=MAX_REQUEST_BYTES,
    )
    try:
        server.start()
        loads: list[dict[str, Any]] = [
            {"model_id": FRAUD[0], "version": FRAUD[1]},
            {"model_id": "linear", "version": "1"},
            {"model_id": "multi", "version": "1"},
            # Merged batches: requests arriving within 50 ms run as one onnxruntime call.
            {"model_id": "lookup", "version": "1", "max_batch_size": 16, "max_queue_delay_us": 50_000},
            {"model_id": "sequence", "version": "1"},
        ]
        for body in loads:
            r = server.client.post("/v1/models/load", json=body)
            assert r.status_code == 200, r.text
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(srv: Server) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def workers(srv: Server) -> dict[str, int]:
    """Worker pids before the test; ``_still_serving`` checks they are the same after."""
    pids = {name: p.pid for name, p in srv.processes().items() if name.startswith("worker-")}
    assert len(pids) == 2
    return pids


def _still_serving(srv: Server, repo: Path, before: dict[str, int]) -> None:
    """No worker restarted, and the demo model answers like onnxruntime on every worker."""
    rng = np.random.default_rng(0)
    for _ in range(4):  # more requests than workers: the least-busy pick reaches both
        f1, f2 = (rng.normal(size=(3, 1)).astype(np.float32) for _ in range(2))
        r = srv.client.post(
            "/v2/models/fraud_detection/versions/2.0.0/infer",
            json={
                "inputs": [
                    {"name": "feature1", "datatype": "FP32", "shape": [3, 1], "data": f1.ravel().tolist()},
                    {"name": "feature2", "datatype": "FP32", "shape": [3, 1], "data": f2.ravel().tolist()},
                ]
            },
        )
        assert r.status_code == 200, r.text
        want = ort_run(repo / "fraud_detection" / "2.0.0" / "model.onnx", {"feature1": f1, "feature2": f2})
        got = {o["name"]: o["data"] for o in r.json()["outputs"]}
        np.testing.assert_allclose(got["fraud_probability"], want["fraud_probability"].ravel(), rtol=1e-6)
    after = {name: p.pid for name, p in srv.processes().items() if name.startswith("worker-")}
    assert after == before, f"a worker restarted: {before} -> {after}\n{srv.log()[-4000:]}"


# ----------------------------------------------------------------------------- zero rows


def _fraud_zero(repo: Path) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    feeds = {name: np.zeros((0, 1), dtype=np.float32) for name in ("feature1", "feature2")}
    return feeds, ort_run(repo / "fraud_detection" / "2.0.0" / "model.onnx", feeds)


def test_zero_rows_on_v1_answer_zero_rows(srv: Server, repo: Path, workers: dict[str, int]) -> None:
    _, want = _fraud_zero(repo)
    assert all(out.shape[0] == 0 for out in want.values())  # what onnxruntime answers
    bodies: list[Any] = [[], {"feature1": [], "feature2": []}]  # no records; empty named tensors
    for inputs in bodies:
        for _ in range(3):
            r = srv.client.post(
                "/v1/infer", json={"model_id": FRAUD[0], "model_version": FRAUD[1], "inputs": inputs}
            )
            assert r.status_code == 200, r.text
            assert r.json()["outputs"] == []
    # Named tensors of a [N, F] input and of strings.
    r = srv.client.post("/v1/infer", json={"model_id": "linear", "inputs": {"x": []}})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == []
    _still_serving(srv, repo, workers)


def test_zero_rows_on_v2_json_and_binary(
    srv: Server, repo: Path, client: tc.InferenceServerClient, workers: dict[str, int]
) -> None:
    feeds, want = _fraud_zero(repo)
    for _ in range(3):
        r = srv.client.post(
            "/v2/models/fraud_detection/versions/2.0.0/infer",
            json={
                "inputs": [{"name": name, "datatype": "FP32", "shape": [0, 1], "data": []} for name in feeds]
            },
        )
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        for name, arr in want.items():
            assert outputs[name]["shape"] == list(arr.shape)
            assert outputs[name]["data"] == []
    for _ in range(3):
        inputs = []
        for name, arr in feeds.items():
            inp = tc.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        result = client.infer(FRAUD[0], inputs, model_version=FRAUD[1])
        for name, arr in want.items():
            got = result.as_numpy(name)
            assert got is not None and got.shape == arr.shape
            # tritonclient makes every empty binary output float64: the header says what it is.
            meta = result.get_output(name)
            assert meta is not None and meta["parameters"]["binary_data_size"] == 0
            assert meta["datatype"] == {"float32": "FP32", "int64": "INT64"}[str(arr.dtype)]
    # Every datatype of the multi model, strings included, as JSON.
    mfeeds: dict[str, Any] = {
        "count": np.zeros((0, 1), np.int64),
        "amount": np.zeros((0, 1), np.float32),
        "flag": np.zeros((0, 1), np.bool_),
        "tag": np.zeros((0, 1), object),
    }
    mwant = ort_run(repo / "multi" / "1" / "model.onnx", mfeeds)
    types = {"count": "INT64", "amount": "FP32", "flag": "BOOL", "tag": "BYTES"}
    r = srv.client.post(
        "/v2/models/multi/infer",
        json={"inputs": [{"name": n, "datatype": t, "shape": [0, 1], "data": []} for n, t in types.items()]},
    )
    assert r.status_code == 200, r.text
    assert {o["name"]: o["shape"] for o in r.json()["outputs"]} == {
        k: list(v.shape) for k, v in mwant.items()
    }
    _still_serving(srv, repo, workers)


def test_zero_rows_through_shared_memory(
    srv: Server, repo: Path, client: tc.InferenceServerClient, workers: dict[str, int]
) -> None:
    feeds, want = _fraud_zero(repo)
    with _region(client, "zin", 64), _region(client, "zout", 64):
        for _ in range(3):
            inputs = []
            for name in feeds:
                inp = tc.InferInput(name, [0, 1], "FP32")
                inp.set_shared_memory("zin", 0)
                inputs.append(inp)
            out = tc.InferRequestedOutput("fraud_probability", binary_data=True)
            out.set_shared_memory("zout", 0)
            result = client.infer(FRAUD[0], inputs, model_version=FRAUD[1], outputs=[out])
            meta = result.get_output("fraud_probability")
            assert meta is not None and meta["shape"] == list(want["fraud_probability"].shape)
    _still_serving(srv, repo, workers)


# ----------------------------------------------------------------------------- failures contained


def test_onnxruntime_errors_are_error_replies(srv: Server, repo: Path, workers: dict[str, int]) -> None:
    # An index onnxruntime refuses: the input is at fault (400 on V2, 422 on /v1).
    for _ in range(3):
        r = srv.client.post(
            "/v2/models/lookup/infer",
            json={"inputs": [{"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [9]}]},
        )
        assert r.status_code == 400, r.text
        assert "out of data bounds" in r.json()["error"]
        r = srv.client.post("/v1/infer", json={"model_id": "lookup", "inputs": {"idx": [[9]]}})
        assert r.status_code == 422, r.text
    # A model whose output the worker cannot encode (it raised TypeError and killed the worker): 500.
    for _ in range(4):
        r = srv.client.post(
            "/v2/models/sequence/infer",
            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]},
        )
        assert r.status_code == 500, r.text
        assert "inference failed" in r.json()["error"]
    _still_serving(srv, repo, workers)


def test_a_bad_request_merged_with_good_ones_fails_alone(
    srv: Server, repo: Path, workers: dict[str, int]
) -> None:
    """Concurrent requests to the batched lookup model, one with an index out of range."""
    indices = [[[0], [1]], [[7]], [[2], [3], [-1]], [[1]]]
    results: dict[int, httpx.Response] = {}
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                results[i] = c.post(
                    "/v2/models/lookup/infer",
                    json={
                        "inputs": [
                            {
                                "name": "idx",
                                "datatype": "INT64",
                                "shape": [len(indices[i]), 1],
                                "data": [v[0] for v in indices[i]],
                            }
                        ]
                    },
                )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(indices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == len(indices), errors
    assert results[1].status_code == 400 and "out of data bounds" in results[1].json()["error"]
    for i in (0, 2, 3):
        assert results[i].status_code == 200, results[i].text
        want = ort_run(repo / "lookup" / "1" / "model.onnx", {"idx": np.array(indices[i], dtype=np.int64)})
        got = results[i].json()["outputs"][0]["data"]
        np.testing.assert_array_equal(got, want["value"].ravel())
    _still_serving(srv, repo, workers)


# ----------------------------------------------------------------------------- client regions


def _region(client: tc.InferenceServerClient, name: str, size: int) -> contextlib.AbstractContextManager[Any]:
    return client_region(client, name, size, "contain")


@pytest.fixture
def shm_path() -> Iterator[Path]:
    """A /dev/shm name the test fills with what it likes; removed whatever it became."""
    path = SHM_DIR / f"ms_contain_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            path.rmdir()


def _register(srv: Server, name: str, key: str, size: int, offset: Any = 0) -> httpx.Response:
    return srv.client.post(
        f"/v2/systemsharedmemory/region/{name}/register",
        json={"key": key, "byte_size": size, "offset": offset},
    )


def _infer_from_region(srv: Server, region: str, x: np.ndarray[Any, Any], offset: int = 0) -> httpx.Response:
    return srv.client.post(
        "/v2/models/linear/infer",
        json={
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {
                        "shared_memory_region": region,
                        "shared_memory_byte_size": x.nbytes,
                        "shared_memory_offset": offset,
                    },
                }
            ]
        },
    )


def _infer_into_region(srv: Server, region: str, rows: int) -> httpx.Response:
    x = np.ones((rows, 3), dtype=np.float32)
    return srv.client.post(
        "/v2/models/linear/infer",
        json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3], "data": x.ravel().tolist()}],
            "outputs": [
                {
                    "name": "label",
                    "parameters": {"shared_memory_region": region, "shared_memory_byte_size": rows * 8},
                }
            ],
        },
    )


def test_region_truncated_after_registration_is_400_not_sigbus(
    srv: Server, repo: Path, shm_path: Path, workers: dict[str, int]
) -> None:
    size, offset = 64 * 1024, 32 * 1024
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    with open(shm_path, "wb") as f:
        f.truncate(size)
        f.seek(offset)
        f.write(x.tobytes())
    assert _register(srv, "trunc", "/" + shm_path.name, size).status_code == 200
    try:
        want = ort_run(repo / "linear" / "1" / "model.onnx", {"x": x})
        # Used once by each worker first (the old code kept such a region mapped).
        for _ in range(4):
            r = _infer_from_region(srv, "trunc", x, offset)
            assert r.status_code == 200, r.text
            scores = next(o for o in r.json()["outputs"] if o["name"] == "scores")["data"]
            np.testing.assert_allclose(scores, want["scores"].ravel(), rtol=1e-6)
            assert _infer_into_region(srv, "trunc", 4).status_code == 200
        os.truncate(shm_path, 4096)
        for _ in range(4):
            r = _infer_from_region(srv, "trunc", x, offset)
            assert r.status_code == 400, r.text
            assert "exceeds shared memory object" in r.json()["error"]
        # An output region truncated under the worker: 400 as well.
        os.truncate(shm_path, 0)
        for _ in range(4):
            r = _infer_into_region(srv, "trunc", 4)
            assert r.status_code == 400, r.text
    finally:
        srv.client.post("/v2/systemsharedmemory/region/trunc/unregister")
    _still_serving(srv, repo, workers)


def test_region_inputs_larger_than_a_request_may_be_are_413(
    srv: Server, repo: Path, shm_path: Path, workers: dict[str, int]
) -> None:
    """A sparse region costs the client nothing; the worker's copy of it must be bounded."""
    rows = 60_000  # 720 kB of FP32 [N, 3]: over this server's MODEL_SERVER_MAX_REQUEST_BYTES
    size = rows * 3 * 4
    assert size > MAX_REQUEST_BYTES
    with open(shm_path, "wb") as f:
        f.truncate(size)  # sparse: no page is backed
    assert _register(srv, "sparse", "/" + shm_path.name, size).status_code == 200
    try:
        r = _infer_from_region(srv, "sparse", np.zeros((0, 3), dtype=np.float32))
        assert r.status_code == 200, r.text  # zero rows of it are fine
        r = srv.client.post(
            "/v2/models/linear/infer",
            json={
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [rows, 3],
                        "parameters": {"shared_memory_region": "sparse", "shared_memory_byte_size": size},
                    }
                ]
            },
        )
        assert r.status_code == 413, r.text
        assert "MODEL_SERVER_MAX_REQUEST_BYTES" in r.json()["error"]
    finally:
        srv.client.post("/v2/systemsharedmemory/region/sparse/unregister")
    _still_serving(srv, repo, workers)


def test_directory_under_dev_shm_is_400(
    srv: Server, repo: Path, shm_path: Path, workers: dict[str, int]
) -> None:
    shm_path.mkdir()
    r = _register(srv, "dir", "/" + shm_path.name, 8)
    assert r.status_code == 400, r.text
    assert "not a regular file" in r.json()["error"] or "cannot be opened" in r.json()["error"]
    # A file registered, then replaced by a directory under the server's feet.
    shm_path.rmdir()
    shm_path.write_bytes(b"\0" * 256)
    assert _register(srv, "dir", "/" + shm_path.name, 256).status_code == 200
    try:
        shm_path.unlink()
        shm_path.mkdir()
        x = np.ones((2, 3), dtype=np.float32)
        for _ in range(4):
            r = _infer_from_region(srv, "dir", x)
            assert r.status_code == 400, r.text
            assert _infer_into_region(srv, "dir", 2).status_code == 400
    finally:
        srv.client.post("/v2/systemsharedmemory/region/dir/unregister")
    _still_serving(srv, repo, workers)


def test_symlink_under_dev_shm_is_400_and_never_followed(
    srv: Server, repo: Path, shm_path: Path, tmp_path: Path, workers: dict[str, int]
) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious bytes, not for clients " * 8)
    before = target.read_bytes()
    shm_path.symlink_to(target)
    r = _register(srv, "link", "/" + shm_path.name, 16)
    assert r.status_code == 400, r.text
    assert "cannot be opened" in r.json()["error"]
    # A file registered, then swapped for a link to the victim: outputs must not land there.
    shm_path.unlink()
    shm_path.write_bytes(b"\0" * 256)
    assert _register(srv, "link", "/" + shm_path.name, 256).status_code == 200
    try:
        shm_path.unlink()
        shm_path.symlink_to(target)
        for _ in range(4):
            r = _infer_into_region(srv, "link", 2)
            assert r.status_code == 400, r.text
            r = _infer_from_region(srv, "link", np.ones((2, 3), dtype=np.float32))
            assert r.status_code == 400, r.text
    finally:
        srv.client.post("/v2/systemsharedmemory/region/link/unregister")
    assert target.read_bytes() == before
    _still_serving(srv, repo, workers)


def test_registrations_are_capped_in_count_and_length(
    srv: Server, client: tc.InferenceServerClient, repo: Path, workers: dict[str, int]
) -> None:
    with contextlib.ExitStack() as stack:
        for i in range(MAX_REGIONS):
            stack.enter_context(_region(client, f"cap{i}", 64))
        key = f"/ms_contain_extra_{secrets.token_hex(3)}"
        handle = shm.create_shared_memory_region("extra", key, 64)
        try:
            r = _register(srv, "extra", key, 64)
            assert r.status_code == 400, r.text
            assert "MODEL_SERVER_MAX_SHM_REGIONS" in r.json()["error"]
        finally:
            shm.destroy_shared_memory_region(handle)
    assert client.get_system_shared_memory_status() == []
    key = f"/ms_contain_len_{secrets.token_hex(3)}"
    handle = shm.create_shared_memory_region("len", key, 64)
    try:
        r = _register(srv, "n" * 129, key, 64)
        assert r.status_code == 400, r.text
        assert "1 to 128 characters" in r.json()["error"]
        r = _register(srv, "long-key", "/" + "k" * 129, 64)
        assert r.status_code == 400, r.text
        # Mistyped numbers are 400 at once (``true`` was dropped by the coordinator: 503 after 5 s).
        for offset, size in ((True, 8), (0, 8.5), ("0", 8), (-1, 8), (0, True)):
            r = _register(srv, "typed", key, size, offset)  # type: ignore[arg-type]
            assert r.status_code == 400, r.text
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(handle)
    _still_serving(srv, repo, workers)
