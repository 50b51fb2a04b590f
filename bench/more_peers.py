"""PyTriton 0.7 and LitServe 0.2.19 as peers, each from its own virtualenv (:mod:`bench.venv`).

- :class:`PyTritonPeer`: :mod:`bench.pytriton_server` in ``.venv-pytriton``: the real
  ``tritonserver`` with its Python backend, ``workers`` model instances per model, V2
  HTTP and gRPC on loopback ports; the MLP also as ``mlp_batched`` with Triton's dynamic
  batcher (same ``max_batch_size`` and queue delay as this server's batched MLP).
- :class:`LitServePeer`: :mod:`bench.litserve_server` in ``.venv-litserve``: 2 API
  servers, ``workers`` inference workers per model, ``fast_queue`` (ZeroMQ), V2 JSON.

Both run the repository's ``bench`` package (``PYTHONPATH``), so the onnxruntime session
options are :mod:`bench.ort_options`'s, as for every other peer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

from bench.models import served_ids
from bench.peers import HOST, Peer, PeerOptions, PeerUnavailable, free_port, http_request
from bench.serverstats import BatchCounters, RequestCounters, triton_batch_counters, triton_requests
from bench.venv import REPO_ROOT

log = logging.getLogger(__name__)

LITSERVE_API_SERVERS = 2


def _stop_gracefully(peer: Peer, signum: int, group: bool) -> None:
    """Ask the peer to stop the way its own docs do, and reap the children it leaves.

    PyTriton shuts tritonserver down on SIGINT (Ctrl-C); on SIGTERM its Python process dies
    and leaves the server and backend stubs (in sessions of their own) to the killer in
    :meth:`Peer.stop`. LitServe's API servers and workers share its session: the group gets
    the signal. Whatever is still alive afterwards, :meth:`Peer.stop` kills by pid."""
    proc = peer.proc
    if proc is None or proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, signum)  # the session start_new_session made: ours alone
        else:
            proc.send_signal(signum)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=peer.options.stop_timeout_s)
    _, alive = psutil.wait_procs(family, timeout=5)
    for child in alive:
        log.warning("%s left pid %d running after exit; killing it", peer.name, child.pid)
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("VIRTUAL_ENV", None)
    return env


class PyTritonPeer(Peer):
    """NVIDIA PyTriton: tritonserver + Python backend, onnxruntime inside the bound callables."""

    name = "pytriton"
    paths = ("v2-json", "v2-binary", "grpc", "py-grpc")

    def __init__(
        self, work_dir: Path, options: PeerOptions, model_files: dict[str, Path], python: Path
    ) -> None:
        super().__init__(work_dir, options)
        self.model_files = model_files
        self.python = python.absolute()  # not resolve(): a venv python is a symlink
        self.metrics_port = 0

    @property
    def label(self) -> str:
        return f"PyTriton 0.7 (tritonserver, Python backend, {self.options.workers} instances)"

    def supports_batching(self) -> bool:
        return True

    def command(self) -> list[str]:
        models = [
            f"{model_id}={path}" for name, path in self.model_files.items() for model_id in served_ids(name)
        ]
        return [
            str(self.python), "-m", "bench.pytriton_server",
            "--host", HOST, "--http-port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--instances", str(self.options.workers),
            "--max-batch-size", str(self.options.max_batch_size),
            "--queue-delay-us", str(self.options.max_queue_delay_us),
            *models,
        ]  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {
            "instances": self.options.workers,
            "batcher (mlp_batched)": {
                "max_batch_size": self.options.max_batch_size,
                "max_queue_delay_microseconds": self.options.max_queue_delay_us,
            },
            "ort threads": 1,
        }

    def start(self) -> None:
        if not self.python.exists():
            raise PeerUnavailable(f"{self.python} not found (.venv-pytriton incomplete)")
        self.port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self._spawn(self.command(), _peer_env(), REPO_ROOT)
        ids = [model_id for name in self.model_files for model_id in served_ids(name)]
        try:
            self._wait_ready(["/v2/health/ready", *[f"/v2/models/{m}/ready" for m in ids]])
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_gracefully(self, signal.SIGINT, group=False)
        super().stop()

    def batch_counters(self, model_id: str) -> BatchCounters | None:
        status, _, body = http_request(self.metrics_port, "GET", "/metrics", b"", {}, timeout=10.0)
        return triton_batch_counters(body.decode(errors="replace"), model_id) if status == 200 else None

    def grpc_request_counters(self, model_id: str) -> RequestCounters | None:
        status, _, body = http_request(self.metrics_port, "GET", "/metrics", b"", {}, timeout=10.0)
        return triton_requests(body.decode(errors="replace"), model_id) if status == 200 else None


class LitServePeer(Peer):
    """Lightning LitServe with ``fast_queue`` (ZeroMQ) and a V2 JSON LitAPI per model."""

    name = "litserve"
    paths = ("v2-json",)

    def __init__(
        self, work_dir: Path, options: PeerOptions, model_files: dict[str, Path], python: Path
    ) -> None:
        super().__init__(work_dir, options)
        self.model_files = model_files
        self.python = python.absolute()

    @property
    def label(self) -> str:
        return (
            f"LitServe 0.2.19 ({LITSERVE_API_SERVERS} API servers, {self.options.workers} workers a model, "
            "fast_queue)"
        )

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "bench.litserve_server", "--host", HOST, "--port", str(self.port),
            "--workers", str(self.options.workers), "--api-servers", str(LITSERVE_API_SERVERS),
            *[f"{name}={path}" for name, path in self.model_files.items()],
        ]  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {
            "num_api_servers": LITSERVE_API_SERVERS,
            "workers_per_device": self.options.workers,
            "fast_queue": True,
            "ort threads": 1,
        }

    def start(self) -> None:
        if not self.python.exists():
            raise PeerUnavailable(f"{self.python} not found (.venv-litserve incomplete)")
        self.port = free_port()
        self._spawn(self.command(), _peer_env(), REPO_ROOT)
        try:
            self._wait_ready(["/health"])
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_gracefully(self, signal.SIGTERM, group=True)
        super().stop()
