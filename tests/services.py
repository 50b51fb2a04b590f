"""Real services for tests: moto's S3 server and an MLflow tracking server, on 127.0.0.1.

Registered as a pytest plugin by ``tests/conftest.py``, so every test package can
use the fixtures:

* ``moto_server`` (session): ``moto_server`` on a free port; ``.endpoint``,
  ``.env`` (dummy credentials + endpoint for clients), ``.client()``,
  ``.create_bucket(name)``.
* ``mlflow_server`` (session): ``mlflow server`` with a sqlite backend store whose
  artifacts live in the moto bucket ``MLFLOW_BUCKET`` (``s3://mlflow/artifacts``
  by default, ``s3://mlflow/proxied`` behind ``mlflow-artifacts:/``). It starts
  at once but is waited for only when ``.tracking_uri`` is first read, so the
  caller can build models meanwhile.
* ``aws_env`` (function): the moto credentials and endpoint in ``os.environ``
  for the test only (boto3 reads them there), with no AWS profile or instance
  metadata lookups.

Every process is started in its own session and stopped with its whole tree
(terminate, then kill after a bounded wait) by the fixture's teardown, and by
``atexit`` should the teardown never run. Services log to files under the
session's temporary directory; a start-up failure includes the log's tail.

Nothing here talks to the network beyond 127.0.0.1: MLflow telemetry is
disabled for the test process and the servers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
MLFLOW_BUCKET = "mlflow"
DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret"
REGION = "us-east-1"

# Set before anything imports mlflow: its telemetry would otherwise call home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

_SCRUBBED_PREFIXES = ("AWS_", "MLFLOW_", "BOTO_")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without AWS/MLflow settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    )
    env.update(extra)
    return env


class ServiceProcess:
    """A server subprocess with a log file; :meth:`stop` ends it and all its children."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_http(self, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll ``url`` until it answers (any HTTP status); fail if the process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited ({code}) while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        try:
            root = psutil.Process(proc.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)


class MotoServer:
    """moto's standalone S3 (and IAM) server."""

    def __init__(self, process: ServiceProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach this server with boto3 (and MLflow's S3 store)."""
        return {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, service: str = "s3", **credentials: str) -> Any:
        """A boto3 client for this server (dummy credentials unless given)."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=credentials.get("aws_access_key_id", DUMMY_KEY_ID),
            aws_secret_access_key=credentials.get("aws_secret_access_key", DUMMY_SECRET),
            region_name=REGION,
        ).client(service, endpoint_url=self.endpoint)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def enforce_auth(self) -> None:
        """From now on requests must be signed by IAM users and allowed by their policies."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            headers={"Content-Type": "text/plain"},  # a form body would hide the count from moto
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def run_moto(workdir: Path, name: str = "moto") -> Iterator[MotoServer]:
    """Start moto_server on a free port; always stopped on exit."""
    port = free_port()
    process = ServiceProcess(
        name,
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        clean_env(AWS_ACCESS_KEY_ID=DUMMY_KEY_ID, AWS_SECRET_ACCESS_KEY=DUMMY_SECRET),
        workdir / f"{name}.log",
    )
    server = MotoServer(process, port)
    try:
        process.start()
        process.wait_http(f"{server.endpoint}/moto-api/", timeout_s=60)
        yield server
    finally:
        process.stop()


class MlflowServer:
    """``mlflow server`` with a sqlite store and artifacts in moto's S3."""

    def __init__(self, process: ServiceProcess, port: int, backend_db: Path, moto: MotoServer) -> None:
        self.process = process
        self.port = port
        self.backend_db = backend_db
        self.moto = moto
        self.bucket = MLFLOW_BUCKET
        self.artifact_root = f"s3://{MLFLOW_BUCKET}/artifacts"
        self.proxied_root = f"s3://{MLFLOW_BUCKET}/proxied"
        self._url = f"http://127.0.0.1:{port}"
        self._ready = False
        self._lock = threading.Lock()

    def wait_ready(self) -> None:
        with self._lock:
            if not self._ready:
                self.process.wait_http(f"{self._url}/health")
                self._ready = True

    @property
    def tracking_uri(self) -> str:
        """The server's URL, once it answers."""
        self.wait_ready()
        return self._url

    @property
    def env(self) -> dict[str, str]:
        """Environment for an MLflow client that logs models to this server (S3 included)."""
        return {**self.moto.env, "MLFLOW_TRACKING_URI": self._url}

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def run_mlflow(workdir: Path, moto: MotoServer, name: str = "mlflow") -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free port (not yet waited for); always stopped on exit."""
    port = free_port()
    backend_db = workdir / f"{name}.db"
    try:
        moto.create_bucket(MLFLOW_BUCKET)
    except Exception as exc:  # a second MLflow server on the same moto shares the bucket
        if "BucketAlreadyOwnedByYou" not in str(exc):
            raise
    process = ServiceProcess(
        name,
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{backend_db}",
            "--default-artifact-root",
            f"s3://{MLFLOW_BUCKET}/artifacts",
            "--artifacts-destination",
            f"s3://{MLFLOW_BUCKET}/proxied",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        clean_env(**moto.env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        workdir / f"{name}.log",
    )
    server = MlflowServer(process, port, backend_db, moto)
    try:
        process.start()
        yield server
    finally:
        process.stop()


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def moto_server(services_dir: Path) -> Iterator[MotoServer]:
    with run_moto(services_dir) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(services_dir: Path, moto_server: MotoServer) -> Iterator[MlflowServer]:
    with run_mlflow(services_dir, moto_server) as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer) -> MotoServer:
    """The moto credentials and endpoint in os.environ for this test only."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "BOTO_")):
            monkeypatch.delenv(key)
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    return moto_server


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` that accepts connections and never answers (for timeouts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"
