"""What the /v1 and /v2 routes share: finding a model's entry and running an inference.

The routes only translate payloads; this module knows the model states, asks
the coordinator when its table may be stale, and brings back a model that LRU
eviction removed from every worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import zmq.asyncio

from ipc.messages import (
    ClientEnsure,
    ClientLoad,
    ClientReply,
    ClientUnload,
    ModelConfig,
    ModelEntry,
    TensorRef,
)
from model_server import metrics
from model_server.settings import Settings

from .coordinator_client import CoordinatorClient, Table
from .dispatcher import BodyLease, CallInput, Dispatcher, InferResult
from .errors import ApiError

log = logging.getLogger(__name__)


# The status recorded for a request whose client left before the answer (nginx's 499).
CLIENT_CLOSED = 499


class Tracker:
    """What one inference request's metrics need, filled in as the request goes.

    Also the context manager ``Service.track`` returns (a plain class: a generator-based
    context manager costs a generator and two frames per request).
    """

    __slots__ = ("model", "protocol", "result", "service", "started", "version")

    def __init__(self, service: Service, protocol: str) -> None:
        self.service = service
        self.protocol = protocol
        self.model = ""  # set once the model is known: unknown names never become label values
        self.version = ""
        self.result: InferResult | None = None
        self.started = 0.0

    def __enter__(self) -> Tracker:
        self.service.inflight += 1
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        service = self.service
        service.inflight -= 1
        if kind is None:
            status = 200
        elif isinstance(exc, ApiError):
            status = 400 if (self.protocol == "v2" and exc.status == 422) else exc.status
        elif isinstance(exc, asyncio.CancelledError):
            status = CLIENT_CLOSED  # the client gave up (a cancelled gRPC call): not a server error
        else:
            status = 500
        key = (self.model or "unknown", self.version, self.protocol, status)
        duration = time.perf_counter() - self.started
        result = self.result
        if result is None:
            service.request_metrics.record(key, duration)
        else:
            service.request_metrics.record(key, duration, result.queue_us / 1e6, result.compute_us / 1e6)


GAUGE_PERIOD_S = 1.0

# Dispatch failures after which a fresh table (and possibly a reload) is worth one retry.
RETRYABLE = frozenset({"model_not_loaded", "no_worker"})


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = zmq.asyncio.Context()
        self.coordinator = CoordinatorClient(self.ctx, settings.run_dir, settings.coordinator_timeout_s)
        self.dispatcher = Dispatcher(
            self.ctx, settings.run_dir, settings.shm_prefix, settings.shm_arena_bytes, settings.workers
        )
        self.coordinator.on_table = self.dispatcher.on_table
        self.draining = False
        self.inflight = 0
        self.request_metrics = metrics.RequestMetrics(settings.metrics_flush_interval_s)
        self._gauges: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.dispatcher.start()
        await self.coordinator.start()
        self._gauges = asyncio.create_task(self._sample_gauges(), name="gauges")

    async def _sample_gauges(self) -> None:
        """Gauges sampled once a second rather than written on every request."""
        while True:
            metrics.INFLIGHT.set(self.inflight)
            metrics.SHM_IN_USE.set(self.dispatcher.arena.allocator.used_bytes)
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
        self.request_metrics.close()
        await self.coordinator.close()
        await self.dispatcher.close()
        self.ctx.term()

    @property
    def table(self) -> Table:
        return self.coordinator.table

    def track(self, protocol: str) -> Tracker:
        """Count one inference request: outcome, latency, queue and compute time, in flight.

        Counted in memory and written to the multiprocess files in batches
        (``metrics.RequestMetrics``, ``MODEL_SERVER_METRICS_FLUSH_INTERVAL_S``).
        """
        return Tracker(self, protocol)

    # --- models ----------------------------------------------------------------------
    def _lookup(self, model_id: str, version: str | None) -> ModelEntry | None:
        table = self.table
        if version:
            return table.models.get((model_id, version))
        return table.latest.get(model_id) or table.named.get(model_id)

    async def entry(self, model_id: str, version: str | None, *, require_ready: bool = True) -> ModelEntry:
        """The model's entry, or the ApiError that fits its absence or state."""
        entry = self._lookup(model_id, version)
        if entry is None or entry.state != "ready":
            # Our snapshot may predate a load that just finished: ask once, for this model only
            # (an unknown name costs the coordinator a dict lookup, not a snapshot of the table).
            reply = await self.coordinator.lookup(model_id, version)
            entry = reply.entry if reply.status == 200 else None
        if entry is None:
            what = f"{model_id}:{version}" if version else model_id
            raise ApiError(404, "model_not_found", f"model {what} is not loaded", {"model_id": model_id})
        if require_ready and entry.state != "ready":
            raise not_ready(entry)
        return entry

    def _check_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "draining", "server is draining", retry_after=5)

    async def load(
        self, model_id: str, version: str, registry_uri: str | None, config: ModelConfig
    ) -> ModelEntry:
        self._check_draining()
        timeout = self.settings.load_timeout_s + 5
        reply = await self.coordinator.request(
            ClientLoad, model_id, version, registry_uri, config, timeout=timeout
        )
        entry = _entry_of(reply, "load_failed", {"model_id": model_id, "version": version})
        await self.coordinator.refresh()  # so this process routes to it at once, before the next publish
        return entry

    async def unload(self, model_id: str, version: str) -> ModelEntry:
        timeout = self.settings.drain_seconds + 10
        reply = await self.coordinator.request(ClientUnload, model_id, version, timeout=timeout)
        entry = _entry_of(reply, "unload_failed", {"model_id": model_id})
        await self.coordinator.refresh()
        return entry

    # --- inference ---------------------------------------------------------------------
    async def infer(
        self,
        entry: ModelEntry,
        inputs: list[CallInput],
        output_names: list[str],
        trace_id: str,
        client_outputs: list[TensorRef] | None = None,
        timeout_s: float | None = None,
        body: BodyLease | None = None,
    ) -> InferResult:
        """Dispatch; if no worker holds the model any more, have the coordinator place it and retry once.

        ``timeout_s`` (a request's own deadline) may shorten, never lengthen, the server's.
        """
        self._check_draining()
        timeout = self.settings.request_timeout_s
        if timeout_s is not None and 0 < timeout_s < timeout:
            timeout = timeout_s
        rest = (inputs, output_names, trace_id, timeout, client_outputs, body)
        try:
            return await self.dispatcher.infer(entry, *rest)
        except ApiError as exc:
            if exc.code not in RETRYABLE:
                raise
        return await self.dispatcher.infer(await self._bring_back(entry), *rest)

    async def _bring_back(self, entry: ModelEntry) -> ModelEntry:
        await self.coordinator.refresh()
        fresh = self._lookup(entry.model_id, entry.version)
        if fresh is None:
            raise ApiError(404, "model_not_found", f"model {entry.model_id}:{entry.version} was unloaded")
        if fresh.state != "ready":
            raise not_ready(fresh)
        if fresh.workers:
            return fresh
        log.info("model %s:%s is on no worker (evicted): reloading", entry.model_id, entry.version)
        timeout = self.settings.load_timeout_s
        reply = await self.coordinator.request(ClientEnsure, entry.model_id, entry.version, timeout=timeout)
        return _entry_of(reply, "model_not_ready")


def _entry_of(reply: ClientReply, code: str, details: dict[str, Any] | None = None) -> ModelEntry:
    """The entry a coordinator reply carries, or its error (``code`` when it names none)."""
    if reply.status != 200 or reply.entry is None:
        raise ApiError(reply.status, reply.code or code, reply.error, details)
    return reply.entry


def not_ready(entry: ModelEntry) -> ApiError:
    model = f"{entry.model_id}:{entry.version}"
    details: dict[str, Any] = {"state": entry.state}
    if entry.state in {"loading", "downloading"}:
        return ApiError(503, "model_not_ready", f"model {model} is {entry.state}", details, retry_after=1)
    if entry.state == "unloading":
        return ApiError(409, "model_unloading", f"model {model} is being unloaded", details)
    return ApiError(409, "model_failed", f"model {model} failed to load: {entry.reason}", details)
