"""The worker's link to the coordinator: hello, heartbeats, loads and unloads.

Runs in its own thread so heartbeats keep flowing while the serving thread is
busy and while a model takes a minute to load (loads run in a separate loader
thread). This thread is the only owner of its DEALER socket; the loader
thread hands results back through a queue and wakes this thread with a byte on
a pipe that the poller watches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import zmq

from ipc import endpoints
from ipc.messages import (
    Heartbeat,
    LoadModel,
    ModelLoaded,
    ModelUnloaded,
    UnloadModel,
    WorkerGoodbye,
    WorkerHello,
    encode,
    worker_inbound_decoder,
)
from model_server.settings import Settings

from .device import Placement
from .runner import InputError, ModelRunner
from .serving import Engine, LoadedModel
from .session_cache import BudgetExceeded, SessionCache

log = logging.getLogger(__name__)

Outbound = ModelLoaded | ModelUnloaded


def load_model(
    msg: LoadModel, index: int, placement: Placement, cache: SessionCache[LoadedModel], engine: Engine
) -> ModelLoaded:
    """Create (or find) the session for ``msg``; evicts LRU sessions to make room."""
    key = (msg.model_id, msg.version)
    held = cache.get(key)
    if held is not None and not held.closing:
        return ModelLoaded(index, msg.model_id, msg.version, True, memory_bytes=held.nbytes)
    try:
        evicted = cache.make_room(os.path.getsize(msg.path), exclude=key)
        runner = ModelRunner(Path(msg.path), placement, msg.schema)
        warmup_ms = 0.0
        if msg.config.warmup:
            started = time.perf_counter()
            try:
                runner.warmup()
                warmup_ms = (time.perf_counter() - started) * 1000
            except Exception as exc:
                log.warning("warm-up of %s:%s failed (%s); serving anyway", msg.model_id, msg.version, exc)
        evicted += cache.make_room(runner.memory_bytes, exclude=key)
    except BudgetExceeded as exc:
        return ModelLoaded(index, msg.model_id, msg.version, False, str(exc), 507 if exc.permanent else 503)
    except InputError as exc:
        return ModelLoaded(index, msg.model_id, msg.version, False, str(exc), 422)
    except FileNotFoundError as exc:
        return ModelLoaded(index, msg.model_id, msg.version, False, f"model file missing: {exc}", 500)
    policy = engine.policy_for(msg.schema, msg.config.batching)
    cache.put(key, LoadedModel(runner, msg.schema, msg.config.batching, policy), runner.memory_bytes)
    log.info(
        "loaded %s:%s in %.1f ms, warmed in %.1f ms (%d bytes, providers %s, batching %s)",
        msg.model_id,
        msg.version,
        runner.load_ms,
        warmup_ms,
        runner.memory_bytes,
        ",".join(runner.providers),
        f"up to {policy.max_batch_size} rows" if policy else "off",
    )
    return ModelLoaded(
        index,
        msg.model_id,
        msg.version,
        True,
        memory_bytes=runner.memory_bytes,
        load_ms=runner.load_ms,
        warmup_ms=warmup_ms,
        evicted=[[k[0], k[1]] for k in evicted],
    )


class ControlLink(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context,  # type: ignore[type-arg]
        settings: Settings,
        index: int,
        endpoint: str,
        placement: Placement,
        cache: SessionCache[LoadedModel],
        engine: Engine,
        stop: threading.Event,
        inflight: Callable[[], int],
    ) -> None:
        super().__init__(name="control", daemon=True)
        self.ctx = ctx
        self.settings = settings
        self.index = index
        self.endpoint = endpoint
        self.placement = placement
        self.cache = cache
        self.engine = engine
        self.stop = stop
        self.inflight = inflight
        self.goodbye_reason = "shutdown"
        self.recycle_requested = threading.Event()
        self._results: queue.Queue[Outbound] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        # Unloads wait for in-flight requests; they must not hold up loads of other models.
        self._unloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unloader")
        self._proc = psutil.Process()
        self._unloaded_since_check = False

    # --- loader thread side ------------------------------------------------------------
    def _post(self, result: Outbound) -> None:
        self._results.put(result)
        os.write(self._wake_w, b"x")

    def _do_load(self, msg: LoadModel) -> None:
        try:
            result = load_model(msg, self.index, self.placement, self.cache, self.engine)
        except Exception as exc:  # never lose the answer: the coordinator waits for it
            log.exception("load of %s:%s failed", msg.model_id, msg.version)
            result = ModelLoaded(self.index, msg.model_id, msg.version, False, f"worker error: {exc}", 500)
        self._post(result)

    def _do_unload(self, msg: UnloadModel) -> None:
        removed = self.cache.remove(
            (msg.model_id, msg.version),
            grace_ns=int(self.settings.unload_grace_s * 1e9),
            timeout=self.settings.drain_seconds or None,
        )
        if removed:
            self._unloaded_since_check = True
            log.info("unloaded %s:%s", msg.model_id, msg.version)
        self._post(ModelUnloaded(self.index, msg.model_id, msg.version, "unload"))

    # --- control thread --------------------------------------------------------------
    def _hello(self) -> WorkerHello:
        return WorkerHello(
            self.index,
            os.getpid(),
            self.endpoint,
            self.placement.label,
            self.settings.worker_max_models,
            self.settings.worker_max_bytes,
        )

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            self.index,
            os.getpid(),
            self.endpoint,
            self.placement.label,
            self.inflight(),
            self._proc.memory_info().rss,
            [[k[0], k[1]] for k in self.cache.held()],
        )

    def _check_recycle(self) -> None:
        mark = self.settings.worker_recycle_rss_bytes
        if not (mark and self._unloaded_since_check):
            return
        self._unloaded_since_check = False
        rss = self._proc.memory_info().rss
        if rss > mark:
            log.warning("RSS %d bytes stays above the recycle mark %d after unloads: recycling", rss, mark)
            self.goodbye_reason = "recycle"
            self.recycle_requested.set()
            self.stop.set()

    def run(self) -> None:
        sock = endpoints.configure(self.ctx.socket(zmq.DEALER))
        sock.connect(endpoints.coordinator_endpoint(self.settings.run_dir))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        sock.send(encode(self._hello()))
        interval = self.settings.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        try:
            while not self.stop.is_set():
                timeout_ms = max(0.0, next_beat - time.monotonic()) * 1000
                events = dict(poller.poll(int(min(timeout_ms, 200))))
                if sock in events:
                    while True:
                        try:
                            payload = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(payload)
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                while True:
                    try:
                        sock.send(encode(self._results.get_nowait()))
                    except queue.Empty:
                        break
                if time.monotonic() >= next_beat:
                    sock.send(encode(self._heartbeat()))
                    next_beat = time.monotonic() + interval
                    self._check_recycle()
            sock.send(encode(WorkerGoodbye(self.index, os.getpid(), self.goodbye_reason)))
        finally:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._unloader.shutdown(wait=False, cancel_futures=True)
            sock.close(linger=endpoints.LINGER_MS)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _dispatch(self, payload: bytes) -> None:
        try:
            msg = worker_inbound_decoder.decode(payload)
        except Exception as exc:
            log.error("undecodable control message: %s", exc)
            return
        if isinstance(msg, LoadModel):
            self._loader.submit(self._do_load, msg)
        else:
            self._unloader.submit(self._do_unload, msg)
