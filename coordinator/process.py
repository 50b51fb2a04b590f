"""Coordinator process shell: sockets, fetch threads and signals around ``CoordinatorCore``.

Sockets (both owned by the main thread):
* ROUTER bound at ``coordinator.ipc``: workers and frontends (DEALER) talk to it.
* PUB bound at ``events.ipc``: table snapshots for the frontends.

Artifact fetches (downloads, checksum, ONNX checker) run on threads: local
artifacts on a pool of their own, remote ones on a ``SourcePool`` bounded per
source (``coordinator/fetchpool.py``), so a source that hangs cannot delay a
local load or another source's. Their results and progress come back through a queue, and a byte on a pipe
wakes the poller, so the loop never blocks on I/O it does not own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import zmq

import loader
from ipc import arena, endpoints
from ipc.messages import (
    ClientEnsure,
    ClientGet,
    ClientIndex,
    ClientLoad,
    ClientLookup,
    ClientShmRegister,
    ClientShmUnregister,
    ClientUnload,
    ModelConfig,
    coordinator_inbound_decoder,
    encode,
)
from loader.errors import LoadError, SourceNotAllowed
from loader.local import repository_index
from loader.redact import redact
from model_server import exitcodes, metrics
from model_server.models_file import ModelsFileError, model_config_from, read_models_file
from model_server.roles import ShutdownFlag, start_role
from model_server.rundir import RunDirError, read_private, write_private
from model_server.settings import Settings, get_settings

from .core import CoordinatorCore, Fetch, Key
from .fetchpool import SourcePool

log = logging.getLogger(__name__)

STATE_FILE = "coordinator-state.json"
CLIENT_REQUESTS = (
    ClientLoad,
    ClientLookup,
    ClientUnload,
    ClientEnsure,
    ClientGet,
    ClientIndex,
    ClientShmRegister,
    ClientShmUnregister,
)
PROGRESS_MIN_INTERVAL_S = 0.5
METRICS_SWEEP_S = 5.0


class CoordinatorProcess:
    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.settings = settings
        self.stop = stop
        self.core = CoordinatorCore(settings)
        self.ctx = zmq.Context()
        self.events: queue.Queue[Callable[[], None]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self.fetchers = ThreadPoolExecutor(
            max_workers=settings.local_fetch_threads, thread_name_prefix="fetch-local"
        )
        self.remote = SourcePool(settings.remote_fetch_threads, settings.remote_fetch_per_source, self._fetch)
        self.state_path = settings.run_dir / STATE_FILE
        # Artifacts load_artifact returned pinned in the cache, by model: released on unload/failure.
        self.artifacts: dict[Key, loader.Artifact] = {}
        self._saved_state = ""

    # --- fetch threads -----------------------------------------------------------------
    def _post(self, event: Callable[[], None]) -> None:
        self.events.put(event)
        os.write(self._wake_w, b"x")

    def _fetch(self, job: Fetch) -> None:
        key, token = job.key, job.token
        last = [0.0]

        def progress(p: loader.Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_MIN_INTERVAL_S or (p.total and p.done >= p.total):
                last[0] = now
                self._post(lambda: self.core.on_progress(key, p.done, p.total, p.rate_bps, token))

        try:
            artifact, schema = loader.load_artifact(key[0], key[1], job.registry_uri, self.settings, progress)
        except LoadError as exc:
            status, message = exc.status, exc.message
            # A policy refusal keeps its code (as when refused on entry); other failures stay load_failed.
            code = exc.code if isinstance(exc, SourceNotAllowed) else "load_failed"
            self._post(lambda: self.core.on_fetch_failed(key, status, message, code, token=token))
            return
        except Exception as exc:
            error = redact(f"{type(exc).__name__}: {exc}")
            log.error("fetching %s:%s failed: %s", key[0], key[1], error)
            self._post(lambda: self.core.on_fetch_failed(key, 500, error, token=token))
            return

        def fetched() -> None:
            used = self.core.on_fetched(
                key, str(artifact.path), artifact.sha256, artifact.size, schema, artifact.source_uri, token
            )
            if not used:  # unloaded or timed out meanwhile: nobody will release it otherwise
                loader.release(artifact)
                return
            previous = self.artifacts.pop(key, None)
            if previous is not None:
                loader.release(previous)
            self.artifacts[key] = artifact

        self._post(fetched)

    def _release_unused(self) -> None:
        """Unpin cached artifacts of models that are gone or failed, so the cache may evict them."""
        for key, artifact in list(self.artifacts.items()):
            entry = self.core.models.get(key)
            if entry is None or entry.state == "failed":
                loader.release(artifact)
                del self.artifacts[key]

    # --- main loop ----------------------------------------------------------------------
    def _startup_models(self) -> None:
        if self.settings.models_file:
            for model_id, version, uri, config in read_models_file(self.settings.models_file):
                self.core.request_load(model_id, version, uri, config)
        if self.settings.load_repository:
            for model_id, version in repository_index(self.settings.model_repository):
                if (model_id, version) not in self.core.models:
                    self.core.request_load(model_id, version, None, model_config_from({}, startup=True))
        try:
            text = read_private(self.state_path)
        except RunDirError as exc:
            log.error("not restoring models: %s", exc)
            text = None
        if text is not None:
            try:
                saved = json.loads(text)
                for item in saved:
                    config = msgspec.convert(item["config"], ModelConfig)
                    if (item["model_id"], item["version"]) not in self.core.models:
                        self.core.request_load(
                            item["model_id"], item["version"], item["registry_uri"], config
                        )
                log.info("restored %d model(s) from %s", len(saved), self.state_path)
            except (ValueError, KeyError, msgspec.ValidationError) as exc:
                log.warning("ignoring unreadable %s: %s", self.state_path, exc)

    def _save_state(self) -> None:
        """Persist the desired model set so a restarted coordinator converges to it."""
        state = json.dumps(msgspec.to_builtins(self.core.desired_models()), sort_keys=True)
        if state != self._saved_state:
            write_private(self.state_path, state)  # 0600: it lists every model's source
            self._saved_state = state

    def run(self) -> int:
        router = endpoints.configure(self.ctx.socket(zmq.ROUTER))
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        pub = endpoints.configure(self.ctx.socket(zmq.PUB), linger_ms=0)
        for sock, endpoint in (
            (router, endpoints.coordinator_endpoint(self.settings.run_dir)),
            (pub, endpoints.events_endpoint(self.settings.run_dir)),
        ):
            path = endpoints.endpoint_path(endpoint)
            if path.exists():
                path.unlink()
            sock.bind(endpoint)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._startup_models()
        log.info("coordinator up (run dir %s)", self.settings.run_dir)
        metrics_dir = metrics.multiprocess_dir()
        next_sweep = time.monotonic()
        try:
            while not self.stop.is_set():
                if metrics_dir is not None and time.monotonic() >= next_sweep:
                    # Live gauges of dead workers/frontends must stop counting.
                    metrics.sweep_dead(metrics_dir, arena.pid_alive)
                    next_sweep = time.monotonic() + METRICS_SWEEP_S
                events = dict(poller.poll(100))
                if router in events:
                    self._drain(router)
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                while True:
                    try:
                        self.events.get_nowait()()
                    except queue.Empty:
                        break
                self.core.tick()
                self._flush(router, pub)
                self._release_unused()
                self._save_state()
        finally:
            self.fetchers.shutdown(wait=False, cancel_futures=True)
            self.remote.shutdown()
            router.close(linger=endpoints.LINGER_MS)
            pub.close(linger=0)
            self.ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return exitcodes.OK

    def _drain(self, router: zmq.Socket) -> None:  # type: ignore[type-arg]
        for _ in range(1000):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.error("dropped a control message with %d frames", len(frames))
                continue
            peer, payload = frames
            try:
                msg = coordinator_inbound_decoder.decode(payload)
            except msgspec.DecodeError as exc:
                log.error("undecodable control message: %s", exc)
                continue
            if isinstance(msg, CLIENT_REQUESTS):
                self.core.handle_client(peer, msg)
            else:
                self.core.handle_worker(peer, msg)

    def _flush(self, router: zmq.Socket, pub: zmq.Socket) -> None:  # type: ignore[type-arg]
        for job in self.core.fetches:
            if job.source:
                self.remote.submit(job)
            else:
                self.fetchers.submit(self._fetch, job)
        self.core.fetches.clear()
        self.remote.retain({job.token for job in self.core.loads.values() if job.fetching})
        for (kind, target), message in self.core.outbox:
            payload = encode(message)
            try:
                if kind == "publish":
                    pub.send(payload)
                elif kind == "worker":
                    worker = self.core.workers.get(target)
                    if worker is not None:
                        router.send_multipart([worker.peer, payload])
                else:
                    router.send_multipart([target, payload])
            except zmq.ZMQError as exc:
                # ROUTER_MANDATORY: the peer went away; its heartbeat timeout handles the rest.
                log.warning("could not deliver %s to %s %r: %s", type(message).__name__, kind, target, exc)
        self.core.outbox.clear()


def _cleanup(settings: Settings) -> None:
    """After a clean stop: sockets, the restart state and every shm segment of this instance."""
    for name in ("coordinator.ipc", "events.ipc", STATE_FILE):
        (settings.run_dir / name).unlink(missing_ok=True)
    arena.sweep(settings.shm_prefix, only_dead=False)


def main() -> int:
    settings = get_settings()
    start_role("coordinator", settings)
    stop = ShutdownFlag().install()
    # Only this process talks to MLflow, and MlflowClient takes its timeout and retries only
    # from environment variables: set them here, from the settings, before any fetch thread.
    loader.mlflow_source.configure_mlflow(settings)
    arena.sweep(settings.shm_prefix, only_dead=True)  # left by a crashed predecessor
    try:
        proc = CoordinatorProcess(settings, stop.event)
        if settings.models_file:
            # Fail fast on a bad file, or one naming a source the policy refuses: a start-up
            # model that can never load would keep /ready false with only a log line to say why.
            for model_id, version, uri, _ in read_models_file(settings.models_file):
                if uri:
                    try:
                        loader.policy.admit(uri, settings)
                    except LoadError as exc:
                        raise ModelsFileError(
                            f"models file {settings.models_file}: {model_id}:{version}: {exc.message}"
                        ) from None
    except (ModelsFileError, OSError) as exc:
        log.error("coordinator cannot boot: %s", exc)
        return exitcodes.BOOT_ERROR
    code = proc.run()
    # Stopped last (supervisord priority): nothing of this instance may stay in /dev/shm.
    # A crash skips this, so the restarted coordinator finds its state file.
    _cleanup(settings)
    return code
