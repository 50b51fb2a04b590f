"""The model-source policy and credential hygiene through the real stack.

One server with the default policy (local models only from its repository, S3
only from ``AWS_S3_BUCKET``, MLflow only at ``MLFLOW_TRACKING_URI``). The S3
endpoint, the configured tracking server and a foreign "MLflow" host are plain
TCP listeners on 127.0.0.1 that count connections: a refused source must not
even connect, so the MLflow token and the AWS keys cannot leave.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_server import demo
from tests import models
from tests.models import ort_run

from .server import Server

BUCKET = "models"
TOKEN = "mlflow-token-that-must-stay-home"
RECORDS = [{"feature1": 0.5, "feature2": 1.5}, {"feature1": -2.0, "feature2": 3.0}]
FORBIDDEN_IN_ANSWERS = ("/etc", "passwd", "/proc", "/dev/shm", "bashrc", "exist", "/tmp")


class Listener:
    """A TCP socket on 127.0.0.1 that accepts, counts and closes connections (bounded thread)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, Listener]]:
    found = {name: Listener() for name in ("tracking", "foreign", "s3")}
    try:
        yield found
    finally:
        for listener in found.values():
            listener.close()


@pytest.fixture(scope="module")
def policy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Its own repository: holds links, one pointing out of it (the shared one stays clean)."""
    repo = tmp_path_factory.mktemp("policy-repo")
    demo.write(repo)
    outside = tmp_path_factory.mktemp("outside")
    models.linear(outside / "model.onnx", features=3)
    (repo / "escape").symlink_to(outside)
    (repo / "linkfile" / "1").mkdir(parents=True)  # a real directory whose model.onnx links out
    (repo / "linkfile" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    (repo / "alias").symlink_to(repo / "fraud_detection" / "2.0.0")  # a link that stays inside
    return repo


@pytest.fixture(scope="module")
def policy_server(policy_repo: Path, listeners: dict[str, Listener]) -> Iterator[Server]:
    models_file = policy_repo.parent / "policy-startup.yaml"
    # A start-up model given by an explicit path inside the repository still loads.
    models_file.write_text(
        f'models:\n  - model_id: startup\n    version: "1"\n'
        f"    registry_uri: {policy_repo / 'fraud_detection' / '2.0.0'}\n"
    )
    srv = Server(
        policy_repo,
        workers=1,
        MODEL_SERVER_MODELS_FILE=models_file,
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{listeners['tracking'].port}",
        MLFLOW_TRACKING_TOKEN=TOKEN,
        AWS_S3_BUCKET=BUCKET,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{listeners['s3'].port}",
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_EC2_METADATA_DISABLED="true",
    )
    # Made 0755 on purpose: the server must tighten a reused run directory to 0700.
    os.chmod(srv.run_dir, 0o755)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _load(srv: Server, model_id: str, uri: str) -> tuple[int, str, dict[str, object]]:
    r = srv.client.post("/v1/models/load", json={"model_id": model_id, "version": "1", "registry_uri": uri})
    return r.status_code, r.text, r.json()


def test_local_paths_outside_the_repository_are_refused_without_a_path(
    policy_server: Server, policy_repo: Path, listeners: dict[str, Listener]
) -> None:
    planted = Path("/dev/shm") / f"planted-{policy_server.instance}.onnx"
    demo_model = policy_repo / "fraud_detection" / "2.0.0" / "model.onnx"
    planted.write_bytes(demo_model.read_bytes())  # a valid model, just in the wrong place
    try:
        uris = [
            "/etc/passwd",
            "/nonexistent/model.onnx",
            "~/.bashrc",
            "../../../../../../etc/passwd",
            "/proc/self/mem",
            str(policy_repo / "escape"),
            str(policy_repo / "escape" / "model.onnx"),
            str(policy_repo / "linkfile" / "1"),
            str(planted),
            planted.as_uri(),
        ]
        for i, uri in enumerate(uris):
            status, text, body = _load(policy_server, f"bad{i}", uri)
            assert status == 403, (uri, text)
            error = body["error"]
            assert isinstance(error, dict) and error["code"] == "source_not_allowed"
            assert "MODEL_SERVER_ALLOWED_LOCAL_ROOTS" in error["message"]
            assert not any(word in text for word in FORBIDDEN_IN_ANSWERS), (uri, text)
        # The V2 repository extension answers the same, in its own error shape.
        r = policy_server.client.post(
            "/v2/repository/models/bad/load", json={"parameters": {"registry_uri": str(planted)}}
        )
        assert r.status_code == 403 and set(r.json()) == {"error"}
        assert "/dev/shm" not in r.text
    finally:
        planted.unlink(missing_ok=True)
    listed = {m["model_id"]: m for m in policy_server.client.get("/v1/models").json()["models"]}
    # Refused on entry: no table entry. Only the link found while fetching (a file inside a
    # directory that passed) leaves a failed one, whose reason names no path either.
    late = f"bad{uris.index(str(policy_repo / 'linkfile' / '1'))}"
    assert {name for name in listed if name.startswith("bad")} <= {late}
    if late in listed:
        assert listed[late]["state"] == "failed"
        assert not any(word in str(listed[late]["reason"]) for word in FORBIDDEN_IN_ANSWERS)


def test_paths_inside_the_repository_load_and_serve(policy_server: Server, policy_repo: Path) -> None:
    c = policy_server.client
    status, text, _ = _load(policy_server, "linked", str(policy_repo / "alias"))
    assert status == 200, text
    model = policy_repo / "fraud_detection" / "2.0.0" / "model.onnx"
    feeds = {
        "feature1": np.array([[r["feature1"]] for r in RECORDS], dtype=np.float32),
        "feature2": np.array([[r["feature2"]] for r in RECORDS], dtype=np.float32),
    }
    expected = ort_run(model, feeds)
    for model_id in ("startup", "linked"):
        r = c.post("/v1/infer", json={"model_id": model_id, "model_version": "1", "inputs": RECORDS})
        assert r.status_code == 200, r.text
        got = [o["fraud_probability"] for o in r.json()["outputs"]]
        np.testing.assert_allclose(got, expected["fraud_probability"][:, 0], rtol=1e-6)


def test_foreign_hosts_and_buckets_are_refused_before_any_connection(
    policy_server: Server, listeners: dict[str, Listener]
) -> None:
    foreign = listeners["foreign"].port
    cases = [
        (f"mlflow-artifacts://127.0.0.1:{foreign}/internal/admin", 403, "MODEL_SERVER_ALLOWED_MLFLOW_HOSTS"),
        (f"mlflow-artifacts://localhost:{foreign}/x", 403, "MODEL_SERVER_ALLOWED_MLFLOW_HOSTS"),
        (f"http://127.0.0.1:{foreign}/api/2.0/mlflow-artifacts/artifacts/x", 400, "unsupported"),
        ("s3://someone-elses-bucket/models/x/", 403, "MODEL_SERVER_ALLOWED_S3_BUCKETS"),
    ]
    for i, (uri, expected, words) in enumerate(cases):
        status, text, _ = _load(policy_server, f"foreign{i}", uri)
        assert status == expected and words in text, (uri, text)
    assert listeners["foreign"].connections == 0
    assert listeners["s3"].connections == 0
    assert TOKEN not in policy_server.log()


def test_credentials_in_a_uri_never_reach_answers_logs_or_the_state_file(
    policy_server: Server, listeners: dict[str, Listener]
) -> None:
    secrets = ["s3cretpassw0rd", "AKIAUSERNAME0", "al1cepassword", "sig0123456789"]
    tracking = listeners["tracking"].port
    uris = [
        f"s3://AKIAUSERNAME0:s3cretpassw0rd@{BUCKET}/models/x/",
        f"mlflow-artifacts://alice:al1cepassword@127.0.0.1:{tracking}/x",
        f"s3://{BUCKET}/models/x/?X-Amz-Signature=sig0123456789",
    ]
    for i, uri in enumerate(uris):
        status, text, body = _load(policy_server, f"cred{i}", uri)
        assert status == 400, text
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "invalid_uri"
        assert "environment" in error["message"]
        assert not any(secret in text for secret in secrets)
    # A good load, so the state file is written; it lists only what was accepted.
    assert _load(policy_server, "good", str(policy_server.repository / "fraud_detection" / "2.0.0"))[0] == 200
    state = policy_server.run_dir / "coordinator-state.json"
    policy_server.wait_for(lambda: "good" in _read(state), 30, "the state file to list the new model")
    everything = policy_server.client.get("/v1/models").text + policy_server.log() + _read(state)
    assert not any(secret in everything for secret in secrets)
    assert listeners["s3"].connections == 0 and listeners["tracking"].connections == 0
    # Private: the state file 0600, the run directory (created 0755 by the test) now 0700.
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE(policy_server.run_dir.stat().st_mode) == 0o700


def test_a_restarted_coordinator_restores_from_the_private_state_file(policy_server: Server) -> None:
    c = policy_server.client
    assert _load(policy_server, "kept", str(policy_server.repository / "fraud_detection" / "2.0.0"))[0] == 200
    state = policy_server.run_dir / "coordinator-state.json"
    policy_server.wait_for(lambda: "kept" in _read(state), 30, "the state file to list the new model")
    old = policy_server.processes()["coordinator"]
    old.kill()  # a crash: the state file stays for the next coordinator
    old.wait(10)

    def restored() -> bool:
        current = policy_server.processes().get("coordinator")
        if current is None or current.pid == old.pid:
            return False
        try:
            models = {m["model_id"]: m["state"] for m in c.get("/v1/models", timeout=2).json()["models"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return models.get("kept") == "ready" and models.get("startup") == "ready"

    policy_server.wait_for(restored, 60, "the restarted coordinator to load the saved models")
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    r = c.post("/v1/infer", json={"model_id": "kept", "model_version": "1", "inputs": RECORDS})
    assert r.status_code == 200, r.text
    model = policy_server.repository / "fraud_detection" / "2.0.0" / "model.onnx"
    feeds = {
        "feature1": np.array([[rec["feature1"]] for rec in RECORDS], dtype=np.float32),
        "feature2": np.array([[rec["feature2"]] for rec in RECORDS], dtype=np.float32),
    }
    expected = ort_run(model, feeds)["fraud_probability"][:, 0]
    np.testing.assert_allclose([o["fraud_probability"] for o in r.json()["outputs"]], expected, rtol=1e-6)


def _read(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text()
    return ""


def test_load_repository_start_up_models_pass_the_policy(tmp_path: Path) -> None:
    """MODEL_SERVER_LOAD_REPOSITORY loads every repository model by its default (local) URI."""
    repo = tmp_path / "repo"
    demo.write(repo)
    models.linear(repo / "linear" / "1" / "model.onnx", features=3)
    srv = Server(repo, workers=1, MODEL_SERVER_LOAD_REPOSITORY="true")
    try:
        srv.start()
        listed = {(m["model_id"], m["version"]): m for m in srv.client.get("/v1/models").json()["models"]}
        assert {k: m["state"] for k, m in listed.items()} == {
            ("fraud_detection", "2.0.0"): "ready",
            ("linear", "1"): "ready",
        }
        x = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]], dtype=np.float32)
        records = [{"f0": float(r[0]), "f1": float(r[1]), "f2": float(r[2])} for r in x]
        r = srv.client.post("/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": records})
        assert r.status_code == 200, r.text
        expected = ort_run(repo / "linear" / "1" / "model.onnx", {"x": x})
        np.testing.assert_allclose([o["scores"] for o in r.json()["outputs"]], expected["scores"], rtol=1e-6)
    finally:
        srv.stop()
