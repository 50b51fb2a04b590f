"""ZeroMQ endpoints and socket construction, in one place.

Every endpoint is an ``ipc://`` path under the run directory, so two servers on
one host never collide and nothing listens on a network interface. Sockets are
created in the process that uses them (never inherited across fork), with an
explicit linger so a closing process neither hangs nor silently drops a final
message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import zmq

# Longest a closing socket keeps trying to deliver queued messages.
LINGER_MS = 500
# Unix socket paths are limited to 107 bytes; say so instead of failing obscurely.
MAX_IPC_PATH = 100

S = TypeVar("S", bound=zmq.Socket)  # type: ignore[type-arg]


def _ipc(run_dir: Path, name: str) -> str:
    path = Path(run_dir) / name
    if len(str(path)) > MAX_IPC_PATH:
        raise ValueError(
            f"socket path {path} is longer than {MAX_IPC_PATH} characters: set MODEL_SERVER_RUN_DIR shorter"
        )
    return f"ipc://{path}"


def coordinator_endpoint(run_dir: Path) -> str:
    return _ipc(run_dir, "coordinator.ipc")


def events_endpoint(run_dir: Path) -> str:
    return _ipc(run_dir, "events.ipc")


def worker_endpoint(run_dir: Path, index: int) -> str:
    return _ipc(run_dir, f"worker-{index}.ipc")


def endpoint_path(endpoint: str) -> Path:
    return Path(endpoint.removeprefix("ipc://"))


def worker_routing_id(index: int) -> bytes:
    return f"w{index}".encode()


def configure(sock: S, *, linger_ms: int = LINGER_MS, hwm: int = 0) -> S:
    sock.setsockopt(zmq.LINGER, linger_ms)
    if hwm:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock
