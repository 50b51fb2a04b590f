"""What the /v1 and /v2 routes share: finding a model's entry and running an inference.

The routes only translate payloads; this module knows the model states, asks
the coordinator when its table may be stale, and brings back a model that LRU
eviction removed from every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from ipc.messages import ModelConfig, ModelEntry, TensorRef
from model_server import metrics
from model_server.settings import Settings

from .coordinator_client import CoordinatorClient, Table
from .dispatcher import BodyLease, Dispatcher, DispatchError, InferResult, InputTensor
from .errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    """What one inference request's metrics need, filled in as the request goes."""

    model: str = ""  # set once the model is known: unknown names never become label values
    version: str = ""
    result: InferResult | None = None


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
        self.coordinator.on_table(self.dispatcher.on_table)
        self.draining = False
        self.inflight = 0
        self._series: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
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
        await self.coordinator.close()
        await self.dispatcher.close()
        self.ctx.term()

    @property
    def table(self) -> Table:
        return self.coordinator.table

    @contextlib.contextmanager
    def track(self, protocol: str) -> Iterator[Tracker]:
        """Count one inference request: outcome, latency, queue and compute time, in flight."""
        tracker = Tracker()
        self.inflight += 1
        started = time.perf_counter()
        status = 500
        try:
            yield tracker
            status = 200
        except (ApiError, DispatchError) as exc:
            status = 400 if (protocol == "v2" and exc.status == 422) else exc.status
            raise
        finally:
            self.inflight -= 1
            model = tracker.model or "unknown"
            version = tracker.version
            key = (model, version, protocol, status)
            series = self._series.get(key)
            if series is None:
                # Label lookups cost more than the updates: keep the children per label set.
                series = self._series[key] = (
                    metrics.REQUESTS.labels(model, version, protocol, str(status)),
                    metrics.REQUEST_DURATION.labels(
                        model, version, protocol, "success" if status == 200 else "fail"
                    ),
                    metrics.QUEUE_DURATION.labels(model, version),
                    metrics.COMPUTE_DURATION.labels(model, version),
                    metrics.LAST_INFERENCE.labels(model, version),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - started)
            if tracker.result is not None:
                series[2].observe(tracker.result.queue_us / 1e6)
                series[3].observe(tracker.result.compute_us / 1e6)
                series[4].set(time.time() * 1000)

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

    async def load(
        self, model_id: str, version: str, registry_uri: str | None, config: ModelConfig
    ) -> ModelEntry:
        if self.draining:
            raise ApiError(503, "draining", "server is draining", retry_after=5)
        reply = await self.coordinator.load(
            model_id, version, registry_uri, config, timeout=self.settings.load_timeout_s + 5
        )
        if reply.status != 200 or reply.entry is None:
            raise ApiError(
                reply.status,
                reply.code or "load_failed",
                reply.error,
                {"model_id": model_id, "version": version},
            )
        await self.coordinator.refresh()  # so this process routes to it at once, before the next publish
        return reply.entry

    async def unload(self, model_id: str, version: str) -> ModelEntry:
        reply = await self.coordinator.unload(model_id, version, timeout=self.settings.drain_seconds + 10)
        if reply.status != 200 or reply.entry is None:
            raise ApiError(reply.status, reply.code or "unload_failed", reply.error, {"model_id": model_id})
        await self.coordinator.refresh()
        return reply.entry

    # --- inference ---------------------------------------------------------------------
    async def infer(
        self,
        entry: ModelEntry,
        inputs: list[InputTensor],
        output_names: list[str],
        trace_id: str,
        client_outputs: list[TensorRef] | None = None,
        timeout_s: float | None = None,
        body: BodyLease | None = None,
    ) -> InferResult:
        """Dispatch; if no worker holds the model any more, have the coordinator place it and retry once.

        ``timeout_s`` (a request's own deadline) may shorten, never lengthen, the server's.
        """
        if self.draining:
            raise ApiError(503, "draining", "server is draining", retry_after=5)
        timeout = self.settings.request_timeout_s
        if timeout_s is not None and 0 < timeout_s < timeout:
            timeout = timeout_s
        try:
            return await self.dispatcher.infer(
                entry, inputs, output_names, trace_id, timeout, client_outputs, body
            )
        except DispatchError as exc:
            if exc.code not in RETRYABLE:
                raise
        entry = await self._bring_back(entry)
        return await self.dispatcher.infer(
            entry, inputs, output_names, trace_id, timeout, client_outputs, body
        )

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
        reply = await self.coordinator.ensure(
            entry.model_id, entry.version, timeout=self.settings.load_timeout_s
        )
        if reply.status != 200 or reply.entry is None:
            raise ApiError(reply.status, reply.code or "model_not_ready", reply.error)
        return reply.entry


def not_ready(entry: ModelEntry) -> ApiError:
    model = f"{entry.model_id}:{entry.version}"
    details: dict[str, Any] = {"state": entry.state}
    if entry.state in {"loading", "downloading"}:
        return ApiError(503, "model_not_ready", f"model {model} is {entry.state}", details, retry_after=1)
    if entry.state == "unloading":
        return ApiError(409, "model_unloading", f"model {model} is being unloaded", details)
    return ApiError(409, "model_failed", f"model {model} failed to load: {entry.reason}", details)
