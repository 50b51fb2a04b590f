"""Starts the real stack (`model-server serve` -> supervisord -> coordinator, workers, frontends).

Each server gets its own run directory, instance name, port and model
repository; ``stop()`` always runs (fixtures call it in ``finally``) and kills
the whole process group if supervisord does not stop in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, repository: Path, workers: int = 2, **env: Any) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))  # short: ipc paths < 100 chars
        self.instance = f"t{os.getpid()}{self.run_dir.name[-6:]}".replace("_", "")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A port of its own even for tests that never speak gRPC: two servers on one
        # SO_REUSEPORT port would take each other's connections.
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.repository = repository
        self.log_path = self.run_dir / "server.log"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "MODEL_SERVER_HOST": "127.0.0.1",
            "MODEL_SERVER_PORT": str(self.port),
            "MODEL_SERVER_GRPC_PORT": str(self.grpc_port),
            "MODEL_SERVER_WORKERS": str(workers),
            "MODEL_SERVER_RUN_DIR": str(self.run_dir),
            "MODEL_SERVER_INSTANCE": self.instance,
            "MODEL_SERVER_MODEL_REPOSITORY": str(repository),
            "MODEL_SERVER_CACHE_DIR": str(self.run_dir / "cache"),
            "MODEL_SERVER_HEARTBEAT_INTERVAL_S": "0.25",
            "MODEL_SERVER_HEARTBEAT_TIMEOUT_S": "2",
            "MODEL_SERVER_DRAIN_SECONDS": "10",
            "MODEL_SERVER_SHM_ARENA_BYTES": str(32 * 1024 * 1024),
            "MODEL_SERVER_LOG_LEVEL": "INFO",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def shm_prefix(self) -> str:
        return f"msrv_{self.instance}_"

    def start(self, ready_timeout: float = 90.0, wait_ready: bool = True) -> Server:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [str(BIN / "model-server"), "serve"],
            env=self.env,
            cwd=self.run_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_for(lambda: self._get("/health") == 200, ready_timeout, "frontend to answer /health")
        if wait_ready:
            self.wait_for(lambda: self._get("/ready") == 200, ready_timeout, "server to be ready")
        return self

    def _get(self, path: str) -> int:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.get(path, timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"timed out after {timeout:.0f} s waiting for {what}\n--- log ---\n{self.log()[-6000:]}"
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- processes --------------------------------------------------------------------
    def processes(self) -> dict[str, psutil.Process]:
        """Role name (coordinator, worker-0, frontend-0, ...) -> process, from supervisord's children."""
        assert self.proc is not None
        found: dict[str, psutil.Process] = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            # Titles are set by each role at start ("model-server: worker 3").
            if "coordinator" in title:
                found["coordinator"] = child
            elif "model-server: worker" in title:
                found[f"worker-{title.split()[-1]}"] = child
            elif "frontend" in title:
                found[f"frontend-{len([k for k in found if k.startswith('frontend')])}"] = child
        return found

    def ctl(self, *args: str) -> str:
        out = subprocess.run(
            [str(BIN / "model-server"), "ctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return out.stdout + out.stderr

    def shm_segments(self) -> list[str]:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(self.shm_prefix))

    def stop(self, timeout: float = 40.0) -> int | None:
        self.client.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Anything of the group left behind is a bug, but must not outlive the test run.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


@contextlib.contextmanager
def started(
    srv: Server, models: Iterable[str] = (), headers: dict[str, str] | None = None
) -> Iterator[Server]:
    """``srv`` started with version 1 of each of ``models`` loaded over /v1; always stopped."""
    try:
        srv.start()
        for model in models:
            r = srv.client.post("/v1/models/load", json={"model_id": model, "version": "1"}, headers=headers)
            assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()
