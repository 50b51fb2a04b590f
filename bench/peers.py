"""The peers under test, each an object with ``start()`` / ``stop()`` / ``url``.

- :class:`OurServer`: ``model-server serve`` (supervisord in the foreground with the
  coordinator, workers and frontends), configured through ``MODEL_SERVER_*`` variables.
- :class:`MLServerPeer`: Seldon MLServer from ``.venv-bench``, serving the same ONNX
  files through :mod:`bench.mlserver_runtime`, in-process (``parallel_workers: 0``) or
  with ``parallel_workers`` equal to our worker count.
- :class:`OrtPeer`: no server; each cell runs :mod:`bench.ort_raw` in its own process.

Every server is started in its own session on 127.0.0.1 and a free port, its output
goes to a log file beside the results, and ``stop()`` sends SIGTERM, waits, then kills
whatever is left of the process tree it started (by pid).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.models import BATCHED_SUFFIX, served_ids
from bench.serverstats import BatchCounters, RequestCounters, ours_batch_counters, ours_grpc_requests
from bench.venv import REPO_ROOT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class PeerUnavailable(RuntimeError):
    """The peer could not be started; the report marks its cells "not available"."""


@dataclass
class PeerOptions:
    workers: int = 2
    frontends: int = 2
    start_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    extra_env: dict[str, str] = field(default_factory=dict)
    ours_command: list[str] = field(default_factory=list)  # default: <venv>/bin/model-server serve


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    try:
        return http_request(port, "GET", path, timeout=timeout)[0]
    except OSError:
        return 0


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Peer:
    """A server (or the in-process baseline) the cells run against."""

    name = "peer"
    paths: tuple[str, ...] = ()
    opt_in_paths: tuple[str, ...] = ()  # run only when --paths or --only names them

    def __init__(self, work_dir: Path, options: PeerOptions) -> None:
        self.work_dir = work_dir
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.grpc_port = 0  # 0: no gRPC endpoint
        self.log_file = work_dir / f"{self.name}.log"
        self.note = ""

    @property
    def label(self) -> str:
        return self.name

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def model_id(self, model: str, batching: bool = False) -> str:
        return model + BATCHED_SUFFIX if batching else model

    def supports_batching(self) -> bool:
        return False

    def settings(self) -> dict[str, Any]:
        """What this peer was started with, for the report."""
        return {}

    def pids(self) -> list[int]:
        """Roots of the process trees whose memory counts for this peer."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def profile_targets(self) -> list[tuple[str, int]]:
        """(role, pid) of processes worth profiling with py-spy."""
        return []

    def frontend_pids(self) -> list[int]:
        """Processes whose CPU per request the report shows (this server's frontends)."""
        return []

    def batch_counters(self, model_id: str) -> BatchCounters | None:
        """Rows and executions of ``model_id`` so far, where the peer exposes them."""
        return None

    def grpc_request_counters(self, model_id: str) -> RequestCounters | None:
        """gRPC calls of ``model_id`` answered so far, where the peer counts them."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    # --- shared process handling -----------------------------------------------------
    def _spawn(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log.info("starting %s: %s (log: %s)", self.name, " ".join(command), self.log_file)
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_ready(self, checks: list[str]) -> None:
        """Poll each GET path until 200, failing early when the process dies."""
        assert self.proc is not None
        deadline = time.monotonic() + self.options.start_timeout_s
        pending = list(checks)
        while pending:
            if self.proc.poll() is not None:
                raise PeerUnavailable(
                    f"{self.name} exited with code {self.proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if http_status(self.port, pending[0]) == 200:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise PeerUnavailable(
                    f"{self.name} not ready after {self.options.start_timeout_s:.0f}s "
                    f"(GET {pending[0]} != 200; raise --start-timeout); last lines of "
                    f"{self.log_file}:\n{log_tail(self.log_file)}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.options.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not exit %.0fs after SIGTERM; killing it", self.name, self.options.stop_timeout_s
                )
                proc.kill()
                proc.wait()
        _, alive = psutil.wait_procs(family, timeout=5)
        for child in alive:
            log.warning("%s left pid %d running after exit; killing it", self.name, child.pid)
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=5)


def _children_matching(root: int, words: tuple[str, ...]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            text = " ".join(child.cmdline()).lower() or child.name().lower()
        except psutil.Error:
            continue
        for word in words:
            if word in text:
                found.append((word, child.pid))
                break
    return found


class OurServer(Peer):
    """This project's server, started with ``model-server serve``."""

    name = "ours"
    paths = ("v2-json", "v2-binary", "v1-records", "v2-shm", "grpc", "py-binary", "py-shm", "py-grpc")

    def __init__(
        self, work_dir: Path, options: PeerOptions, repository: Path, model_names: list[str]
    ) -> None:
        super().__init__(work_dir, options)
        self.repository = repository
        self.model_names = model_names
        # ipc:// socket paths must stay under ~100 bytes: a short directory in /tmp.
        self.run_dir = Path(f"/tmp/msb-{os.getpid()}")
        self.models_file = work_dir / "ours-models.yaml"

    @property
    def label(self) -> str:
        return f"this server ({self.options.workers} workers, {self.options.frontends} frontend(s))"

    def supports_batching(self) -> bool:
        return True

    def command(self) -> list[str]:
        if self.options.ours_command:
            return list(self.options.ours_command)
        here = Path(sys.executable).parent / "model-server"
        return [str(here if here.exists() else REPO_ROOT / ".venv" / "bin" / "model-server"), "serve"]

    def model_entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for name in self.model_names:
            for model_id in served_ids(name):
                entry: dict[str, Any] = {"model_id": model_id, "version": "1"}
                if model_id.endswith(BATCHED_SUFFIX):
                    entry["max_batch_size"] = self.options.max_batch_size
                    entry["max_queue_delay_us"] = self.options.max_queue_delay_us
                entries.append(entry)
        return entries

    def write_models_file(self) -> None:
        import yaml

        self.models_file.parent.mkdir(parents=True, exist_ok=True)
        text = "# Written by bench/run.py: the models /ready waits for.\n"
        text += yaml.safe_dump({"models": self.model_entries()}, sort_keys=False)
        self.models_file.write_text(text)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MODEL_SERVER_HOST": HOST,
                "MODEL_SERVER_PORT": str(self.port),
                "MODEL_SERVER_WORKERS": str(self.options.workers),
                "MODEL_SERVER_FRONTEND_PROCESSES": str(self.options.frontends),
                "MODEL_SERVER_RUN_DIR": str(self.run_dir),
                "MODEL_SERVER_INSTANCE": f"bench{os.getpid()}",
                "MODEL_SERVER_MODEL_REPOSITORY": str(self.repository),
                "MODEL_SERVER_MODELS_FILE": str(self.models_file),
                "MODEL_SERVER_CACHE_DIR": str(self.work_dir / "ours-cache"),
                "MODEL_SERVER_ALLOW_CLIENT_SHM": "true",
                "MODEL_SERVER_ACCESS_LOG": "false",
                "MODEL_SERVER_GPUS": "none",
                "MODEL_SERVER_ORT_INTRA_OP_THREADS": "1",
                "MODEL_SERVER_DRAIN_SECONDS": "5",
                "MODEL_SERVER_GRPC_PORT": str(self.grpc_port),
            }
        )
        env.update(self.options.extra_env)
        return env

    def settings(self) -> dict[str, Any]:
        env = self.environment()
        return {key: value for key, value in sorted(env.items()) if key.startswith("MODEL_SERVER_")}

    def start(self) -> None:
        command = self.command()
        if not Path(command[0]).exists():
            raise PeerUnavailable(f"{command[0]} not found (run `make install`)")
        self.port = free_port()
        self.grpc_port = free_port()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_models_file()
        self._spawn(command, self.environment(), REPO_ROOT)
        try:
            self._wait_ready(["/ready"])
            self._ensure_models_loaded()
        except Exception:
            self.stop()
            raise

    def _ensure_models_loaded(self) -> None:
        """Load through the repository API any model the models file did not bring up."""
        for entry in self.model_entries():
            model_id = entry["model_id"]
            if http_status(self.port, f"/v2/models/{model_id}/ready") == 200:
                continue
            parameters = {k: v for k, v in entry.items() if k != "model_id"}
            body = json.dumps({"parameters": parameters}).encode()
            status, _, data = http_request(
                self.port,
                "POST",
                f"/v2/repository/models/{model_id}/load",
                body,
                {"Content-Type": "application/json"},
                timeout=self.options.start_timeout_s,
            )
            if status != 200 or http_status(self.port, f"/v2/models/{model_id}/ready") != 200:
                raise PeerUnavailable(f"model {model_id} did not load: HTTP {status} {data[:300]!r}")

    def profile_targets(self) -> list[tuple[str, int]]:
        if self.proc is None:
            return []
        targets = _children_matching(self.proc.pid, ("frontend", "worker"))
        first: dict[str, tuple[str, int]] = {}
        for role, pid in targets:
            first.setdefault(role, (role, pid))
        return list(first.values())

    def frontend_pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [pid for _, pid in _children_matching(self.proc.pid, ("frontend",))]

    def batch_counters(self, model_id: str) -> BatchCounters | None:
        status, _, body = http_request(self.port, "GET", "/metrics", b"", {}, timeout=10.0)
        return ours_batch_counters(body.decode(errors="replace"), model_id) if status == 200 else None

    def grpc_request_counters(self, model_id: str) -> RequestCounters | None:
        status, _, body = http_request(self.port, "GET", "/metrics", b"", {}, timeout=10.0)
        return ours_grpc_requests(body.decode(errors="replace"), model_id) if status == 200 else None

    def stop(self) -> None:
        super().stop()
        leftovers = sorted(Path("/dev/shm").glob(f"msrv_bench{os.getpid()}_*"))
        if leftovers:
            self.note = f"left {len(leftovers)} /dev/shm segment(s) after stop: {leftovers[0].name}..."
            log.warning("ours: %s", self.note)
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MLServerPeer(Peer):
    """Seldon MLServer from ``.venv-bench`` with the onnxruntime custom runtime (V2 REST and gRPC)."""

    paths = ("v2-json", "grpc", "py-grpc")

    def __init__(
        self, work_dir: Path, options: PeerOptions, models_dir: Path, python: Path, parallel: bool
    ) -> None:
        self.parallel_workers = options.workers if parallel else 0
        self.name = "mlserver-parallel" if parallel else "mlserver"
        # The default plan measures MLServer's gRPC once (in-process), keeping the run time.
        self.opt_in_paths = ("grpc",) if parallel else ()
        super().__init__(work_dir, options)
        self.models_dir = models_dir.absolute()
        self.python = python.absolute()  # not resolve(): a venv python is a symlink

    @property
    def label(self) -> str:
        if self.parallel_workers:
            return f"MLServer, parallel_workers={self.parallel_workers}"
        return "MLServer, in-process (parallel_workers=0)"

    def server_settings(self, http_port: int, grpc_port: int) -> dict[str, Any]:
        return {
            "host": HOST,
            "http_port": http_port,
            "grpc_port": grpc_port,
            "parallel_workers": self.parallel_workers,
            # Off on purpose, in MLServer's favour: no uvicorn access log (debug), no
            # Prometheus metrics middleware or server, no gzip middleware.
            "debug": False,
            "metrics_endpoint": None,
            "gzip_enabled": False,
            "load_models_at_startup": True,
        }

    def settings(self) -> dict[str, Any]:
        return self.server_settings(self.port, 0) | {"grpc_port": "a free port"}

    def start(self) -> None:
        mlserver = self.python.parent / "mlserver"
        if not mlserver.exists():
            raise PeerUnavailable(f"{mlserver} not found (.venv-bench incomplete)")
        self.port, self.grpc_port = free_port(), free_port()
        settings = self.server_settings(self.port, self.grpc_port)
        (self.models_dir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        for key in [k for k in env if k.startswith("MLSERVER_")]:
            del env[key]
        self._spawn([str(mlserver), "start", str(self.models_dir)], env, self.models_dir)
        models = sorted(p.parent.name for p in self.models_dir.glob("*/model-settings.json"))
        try:
            self._wait_ready(["/v2/health/ready", *[f"/v2/models/{m}/ready" for m in models]])
        except Exception:
            self.stop()
            raise

    def profile_targets(self) -> list[tuple[str, int]]:
        if self.proc is None:
            return []
        targets = [("main", self.proc.pid)]
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.proc.pid).children(recursive=False)
            if self.parallel_workers and children:
                targets.append(("worker", children[-1].pid))
        return targets


class OrtPeer(Peer):
    """Raw onnxruntime in-process: no server; each cell runs in a fresh process."""

    name = "ort"
    paths = ("in-process",)

    def __init__(self, work_dir: Path, options: PeerOptions) -> None:
        super().__init__(work_dir, options)
        self.current: subprocess.Popen[str] | None = None

    @property
    def label(self) -> str:
        return "onnxruntime in-process (1 thread, no server)"

    @property
    def url(self) -> str:
        return ""

    def settings(self) -> dict[str, Any]:
        return {"intra_op_num_threads": 1, "inter_op_num_threads": 1, "provider": "CPUExecutionProvider"}

    def pids(self) -> list[int]:
        proc = self.current
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def start(self) -> None:
        return None

    def stop(self) -> None:
        proc, self.current = self.current, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def run(
        self, model_path: Path, model: str, batch: int, duration_s: float, warmup_s: float, reps: int
    ) -> list[dict[str, Any]]:
        command = [
            sys.executable, "-m", "bench.ort_raw", str(model_path), "--name", model, "--batch", str(batch),
            "--duration", str(duration_s), "--warmup", str(warmup_s), "--reps", str(reps),
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = self.current = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = self.current.communicate(timeout=warmup_s + reps * duration_s + 120)
        finally:
            self.stop()
        code = proc.returncode
        if code != 0:
            raise RuntimeError(f"bench.ort_raw exited {code}: {err.strip()[-500:]}")
        reps_json: list[dict[str, Any]] = json.loads(out)["reps"]
        return reps_json
