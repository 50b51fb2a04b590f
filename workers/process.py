"""Worker process shell: placement, sockets, threads and signals around ``serving.Engine``.

Threads and what they own:
* main thread: the serving ROUTER socket bound at ``worker-<index>.ipc``; it
  receives ``InferRequest`` from frontends, runs them through the Engine and
  replies. It blocks in ``poll`` (no spinning) with a timeout no longer than
  the earliest batching deadline.
* control thread (``workers.control``): the DEALER to the coordinator.
* loader / unloader threads: create and drop ONNX Runtime sessions.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import zmq

from ipc import endpoints
from ipc.arena import SegmentCache, SpillWriter
from ipc.messages import BatchConfig, encode, infer_request_decoder
from model_server import exitcodes, metrics
from model_server.roles import ShutdownFlag, start_role
from model_server.settings import Settings, get_settings

from . import device
from .control import ControlLink
from .serving import Engine, LoadedModel, Out
from .session_cache import SessionCache

log = logging.getLogger(__name__)

# Requests taken off the socket per wake-up before batches are cut: bounds how long a
# flood of requests can keep queued batches from running.
DRAIN_MAX = 256
IDLE_POLL_MS = 200  # nothing queued: wake up this often to notice a stop
PRUNE_EVERY_S = 5.0


class WorkerProcess:
    def __init__(self, settings: Settings, placement: device.Placement, stop: threading.Event) -> None:
        self.settings = settings
        self.index = settings.worker_index
        self.placement = placement
        self.stop = stop
        self.endpoint = endpoints.worker_endpoint(settings.run_dir, self.index)
        self.cache: SessionCache[LoadedModel] = SessionCache(
            settings.worker_max_models, settings.worker_max_bytes
        )
        self.segments = SegmentCache(settings.shm_prefix)
        self.engine = Engine(
            self.cache,
            self.segments,
            SpillWriter(settings.shm_prefix),
            BatchConfig(
                max_batch_size=settings.max_batch_size,
                max_queue_delay_us=settings.max_queue_delay_us,
                max_queue_size=settings.max_queue_size,
            ),
            self.index,
        )
        self.ctx = zmq.Context()
        self.control = ControlLink(
            self.ctx,
            settings,
            self.index,
            self.endpoint,
            placement,
            self.cache,
            self.engine,
            stop,
            lambda: self.engine.running + self.engine.queued,
        )

    def run(self) -> int:
        path = endpoints.endpoint_path(self.endpoint)
        if path.exists():
            path.unlink()  # left by a predecessor that was killed
        sock = endpoints.configure(self.ctx.socket(zmq.ROUTER))
        sock.setsockopt(zmq.ROUTING_ID, endpoints.worker_routing_id(self.index))
        sock.bind(self.endpoint)
        self.control.start()
        log.info("worker %d serving on %s (%s)", self.index, self.endpoint, self.placement.label)
        try:
            self._serve(sock)
        finally:
            self.engine.flush(force=True)
            self.control.join(timeout=5)
            sock.close(linger=endpoints.LINGER_MS)
            path.unlink(missing_ok=True)
            self.segments.close()
            self.ctx.term()
        if self.control.recycle_requested.is_set():
            return exitcodes.RECYCLE
        return exitcodes.OK

    def _serve(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        engine = self.engine
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self.stop.is_set():
            drained = True
            if poller.poll(self._poll_timeout_ms()):
                # Everything already sent to us is queued before any batch is cut, so a
                # batch is formed from the whole backlog, not from one wake-up's worth.
                drained = self._drain(sock)
            self._send_all(sock, engine.flush())
            metrics.QUEUED.set(engine.queued)
            if drained:
                # Every request sent before an unload's grace ended has been taken: close it now.
                self.cache.close_due(time.monotonic_ns())
            if time.monotonic() >= next_prune:
                self.segments.prune()
                next_prune = time.monotonic() + PRUNE_EVERY_S

    def _poll_timeout_ms(self) -> int:
        """Block until the earliest batching or unload deadline, not at all while a batch is ready."""
        if self.engine.ready_now():
            return 0
        dues = [d for d in (self.engine.next_due_ns(), self.cache.next_close_ns()) if d is not None]
        if not dues:
            return IDLE_POLL_MS
        return max(0, math.ceil((min(dues) - time.monotonic_ns()) / 1e6))

    def _drain(self, sock: zmq.Socket) -> bool:  # type: ignore[type-arg]
        """Take up to DRAIN_MAX requests without blocking; True when the socket was found empty."""
        for _ in range(DRAIN_MAX):
            try:
                peer, payload = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            except ValueError:
                log.error("dropped a message with an unexpected frame count")
                continue
            try:
                request = infer_request_decoder.decode(payload)
            except Exception as exc:
                log.error("undecodable inference message: %s", exc)
                continue
            self._send_all(sock, self.engine.submit(peer, request))
        return False

    @staticmethod
    def _send_all(sock: zmq.Socket, replies: Out) -> None:  # type: ignore[type-arg]
        for to, reply in replies:
            sock.send_multipart([to, encode(reply)])


def main() -> int:
    settings = get_settings()
    index = settings.worker_index
    start_role(f"worker-{index}", settings, f"worker {index}")
    stop = ShutdownFlag().install()
    try:
        detected = device.detect_gpu_count()
        gpu_ids = settings.gpu_ids(detected)
        missing = [g for g in gpu_ids if g >= detected]
        if missing:
            raise ValueError(f"GPU(s) {missing} configured but {detected} GPU(s) found")
        placement = device.plan(
            index,
            settings.workers,
            gpu_ids,
            device.available_cpus(),
            settings.cpu_affinity,
            settings.ort_intra_op_threads,
        )
        device.apply(placement)
        if placement.gpu is not None:
            from .runner import available_providers

            if "CUDAExecutionProvider" not in available_providers():
                log.error("GPU %s configured but onnxruntime has no CUDA provider", placement.gpu)
                return exitcodes.BOOT_ERROR
    except (ValueError, OSError) as exc:
        log.error("worker %d cannot boot: %s (check MODEL_SERVER_GPUS)", index, exc)
        return exitcodes.BOOT_ERROR
    log.info("worker %d pid %d placed on %s", index, os.getpid(), placement.label)
    return WorkerProcess(settings, placement, stop.event).run()
