"""Prometheus metrics: every name and label in one place (the README's metrics table mirrors this).

Several processes serve one server, so prometheus-client runs in multiprocess
mode: ``model-server serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at
``<run dir>/metrics`` for every process, each process writes its own values
there, and any frontend's ``/metrics`` aggregates them. Facts the coordinator
owns (models, their memory, workers up, restarts, evictions) are read from the
frontend's copy of the coordinator's table at scrape time instead
(``TableCollector``), so they are never stale or double counted.

=================================================  =========  ================================
name                                               kind       labels
=================================================  =========  ================================
model_server_requests_total                        counter    model, version, protocol, status
model_server_request_duration_seconds              histogram  model, version, protocol, outcome
model_server_queue_duration_seconds                histogram  model, version
model_server_compute_duration_seconds              histogram  model, version
model_server_batch_size_rows                       histogram  model, version, worker (rows per ORT call)
model_server_last_inference_timestamp_ms           gauge      model, version (max over frontends)
model_server_inflight_requests                     gauge      (sum over frontends)
model_server_queued_requests                       gauge      (sum over workers' batch queues)
model_server_shm_bytes_in_use                      gauge      (sum over frontend arenas)
model_server_model_load_duration_seconds           histogram  model
model_server_model_load_failures_total             counter    reason (not_found, timeout, ...)
model_server_models                                gauge      state
model_server_model_memory_bytes                    gauge      model, version
model_server_model_workers                         gauge      model, version
model_server_worker_up                             gauge      worker, device
model_server_worker_restarts_total                 counter    worker
model_server_worker_rss_bytes                      gauge      worker
model_server_evictions_total                       counter    (LRU evictions, all workers)
=================================================  =========  ================================
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import mmap
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ipc.arena import pid_alive

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "model_server_requests", "Inference requests answered.", ["model", "version", "protocol", "status"]
)
REQUEST_DURATION = Histogram(
    "model_server_request_duration_seconds",
    "Time from request received to response ready, in the frontend (outcome: success or fail).",
    ["model", "version", "protocol", "outcome"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "model_server_queue_duration_seconds",
    "Time a request waited in the worker before its ONNX Runtime call (batching included).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "model_server_compute_duration_seconds",
    "Duration of the ONNX Runtime call that served a request.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
BATCH_ROWS = Histogram(
    "model_server_batch_size_rows",
    "Rows per ONNX Runtime call, as executed, by worker.",
    ["model", "version", "worker"],
    buckets=BATCH_BUCKETS,
)
LAST_INFERENCE = Gauge(
    "model_server_last_inference_timestamp_ms",
    "When the model last answered a request, in milliseconds since the epoch.",
    ["model", "version"],
    multiprocess_mode="max",
)
INFLIGHT = Gauge(
    "model_server_inflight_requests",
    "Inference requests being served by the frontends.",
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "model_server_queued_requests",
    "Requests waiting in the workers' batching queues.",
    multiprocess_mode="livesum",
)
SHM_IN_USE = Gauge(
    "model_server_shm_bytes_in_use",
    "Bytes of the frontends' shared-memory arenas in use.",
    multiprocess_mode="livesum",
)
LOAD_DURATION = Histogram(
    "model_server_model_load_duration_seconds",
    "Time from load request to model ready (download included).",
    ["model"],
    buckets=LOAD_BUCKETS,
)
# Labelled by a bounded reason, never by the model: a client may ask for any number of ids that
# never load, and each would otherwise be a series for ever.
LOAD_FAILURES = Counter(
    "model_server_model_load_failures",
    "Model loads that failed, by reason (not_found, denied, invalid, timeout, source_unavailable, ...).",
    ["reason"],
)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


_DB_PID = re.compile(r"_(\d+)\.db$")


def sweep_dead(directory: Path, alive: Callable[[int], bool]) -> int:
    """Forget live gauges of processes that died (a restarted frontend or worker)."""
    from prometheus_client import multiprocess

    dead = 0
    for path in directory.glob("gauge_live*.db"):
        match = _DB_PID.search(path.name)
        if match and not alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), str(directory))  # type: ignore[no-untyped-call]
            dead += 1
    return dead


class TableCollector(Collector):
    """Coordinator-owned facts, read from the frontend's table snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        table = self.snapshot()
        if table is None:
            return
        states = GaugeMetricFamily(
            "model_server_models", "Models known to the coordinator, by state.", labels=["state"]
        )
        counts: dict[str, int] = {}
        memory = GaugeMetricFamily(
            "model_server_model_memory_bytes",
            "Resident memory of a model in one worker.",
            labels=["model", "version"],
        )
        holders = GaugeMetricFamily(
            "model_server_model_workers", "Workers holding a model's session.", labels=["model", "version"]
        )
        for entry in table.models:
            counts[entry.state] = counts.get(entry.state, 0) + 1
            if entry.state == "ready":
                memory.add_metric([entry.model_id, entry.version], entry.memory_bytes)
                holders.add_metric([entry.model_id, entry.version], len(entry.workers))
        for state in ("downloading", "loading", "ready", "failed", "unloading"):
            states.add_metric([state], counts.get(state, 0))
        up = GaugeMetricFamily(
            "model_server_worker_up", "1 while a worker is alive.", labels=["worker", "device"]
        )
        restarts = CounterMetricFamily(
            "model_server_worker_restarts",
            "Times a worker index came back with a new process.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "model_server_worker_rss_bytes", "Resident memory of a worker.", labels=["worker"]
        )
        for worker in table.workers:
            up.add_metric([str(worker.index), worker.device], 1 if worker.alive else 0)
            restarts.add_metric([str(worker.index)], worker.restarts)
            rss.add_metric([str(worker.index)], worker.rss_bytes if worker.alive else 0)
        evictions = CounterMetricFamily("model_server_evictions", "Sessions evicted by workers' LRU caches.")
        evictions.add_metric([], float(getattr(table, "evictions", 0)))
        yield from (states, memory, holders, up, restarts, rss, evictions)


class _Observations:
    """Observations of one histogram child not yet written: a count per bucket and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        # The first bound >= value: prometheus-client's own choice of bucket (le is inclusive).
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def write(self, child: Any) -> None:
        # prometheus-client has no public call for many observations at once; its histogram
        # child keeps one value per bucket (not cumulative) and one for the sum, as here.
        buckets = child._buckets
        for index, count in enumerate(self.counts):
            if count:
                buckets[index].inc(count)
        child._sum.inc(self.total)


class _Pending:
    """One label set's requests since the last flush."""

    __slots__ = ("compute", "duration", "last_ms", "queue", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = _Observations()
        self.queue: _Observations | None = None
        self.compute: _Observations | None = None
        self.last_ms = 0.0


RequestKey = tuple[str, str, str, int]  # model, version, protocol, HTTP status

_MARK = struct.Struct("d")
_MARK_NAME = re.compile(r"^pending_(\d+)_\d+\.bin$")


class _PendingMark:
    """When this recorder's oldest unwritten request was counted (``time.monotonic()``, 0: none),
    in an 8-byte file of the multiprocess directory, so that a reader in another process can
    wait until what was answered before its read is written (``await_other_writers``)."""

    def __init__(self, directory: Path | None, serial: int) -> None:
        self.path: Path | None = None
        self._map: mmap.mmap | None = None
        if directory is None or not directory.is_dir():
            return
        self.path = directory / f"pending_{os.getpid()}_{serial}.bin"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _MARK.size)
            self._map = mmap.mmap(fd, _MARK.size)
        finally:
            os.close(fd)

    def set(self, value: float) -> None:
        if self._map is not None:
            _MARK.pack_into(self._map, 0, value)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def await_other_writers(limit_s: float, alive: Callable[[int], bool]) -> bool:
    """Wait until every other live process has written the requests it counted before now.

    Each waits at most its flush interval (and event-loop lag); a process that does not
    within ``limit_s`` (wedged) is left out. True when none was left out.
    """
    directory = multiprocess_dir()
    if directory is None or not directory.is_dir():
        return True
    started = time.monotonic()
    give_up = started + limit_s
    for path in directory.glob("pending_*.bin"):
        match = _MARK_NAME.match(path.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue  # ours was flushed by the caller
        if not alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()  # a process that died without closing (its counts went with it)
            continue
        if not _wait_for_mark(path, started, give_up):
            return False
    return True


def _wait_for_mark(path: Path, started: float, give_up: float) -> bool:
    for _ in range(100_000):  # bounded by give_up; the count only bounds the loop itself
        try:
            raw = path.read_bytes()
        except OSError:
            return True  # closed meanwhile: flushed
        since = _MARK.unpack(raw)[0] if len(raw) == _MARK.size else 0.0
        if since == 0.0 or since > started or time.monotonic() > give_up:
            return since == 0.0 or since > started
        time.sleep(MARK_POLL_S)
    return False


class RequestMetrics:
    """The per-request series, counted in process memory and written in batches.

    prometheus-client's multiprocess mode turns every ``inc``/``observe`` into locked writes
    to a memory-mapped file (eight per request here). Instead, requests are summed per
    label set and written at most ``flush_interval_s`` after the first one not yet written
    (a timer armed only while something is pending), when this process serves ``/metrics``
    or the statistics extension, and when the frontend stops. The files lag by at most
    ``flush_interval_s`` (plus event-loop lag); a reader closes that gap with ``settle``,
    which waits for the other processes' marks (``_PendingMark``), so what /metrics and the
    statistics show is exact. Nothing is lost or counted twice; ``flush_interval_s`` 0
    writes every request at once.
    """

    def __init__(self, flush_interval_s: float) -> None:
        self.flush_interval_s = flush_interval_s
        self._pending: dict[RequestKey, _Pending] = {}
        self._children: dict[RequestKey, tuple[Any, ...]] = {}
        # The statistics extension reads (and so flushes) from a worker thread.
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._mark = _PendingMark(multiprocess_dir(), next(_SERIALS))
        self._marked = False
        _RECORDERS.add(self)

    def record(
        self, key: RequestKey, duration_s: float, queue_s: float | None = None, compute_s: float | None = None
    ) -> None:
        """One answered request; ``queue_s``/``compute_s`` when a worker ran it."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending()
            pending.requests += 1
            pending.duration.add(duration_s)
            if queue_s is not None and compute_s is not None:
                if pending.queue is None or pending.compute is None:
                    pending.queue, pending.compute = _Observations(), _Observations()
                pending.queue.add(queue_s)
                pending.compute.add(compute_s)
                pending.last_ms = time.time() * 1000
            if not self._marked:
                self._marked = True
                self._mark.set(time.monotonic())
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self.flush_interval_s <= 0:
            self.flush()
            return
        self._timer = loop.call_later(self.flush_interval_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write what is pending to this process's multiprocess files."""
        with self._lock:
            pending, self._pending = self._pending, {}
            for key, counts in pending.items():
                self._write(key, counts)
            if self._marked:
                self._marked = False
                self._mark.set(0.0)  # after the writes: a reader that sees 0 finds them in the files

    def close(self) -> None:
        """Flush and stop the timer (the frontend is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._mark.close()

    def _write(self, key: RequestKey, counts: _Pending) -> None:
        children = self._children.get(key)
        if children is None:
            model, version, protocol, status = key
            children = self._children[key] = (
                REQUESTS.labels(model, version, protocol, str(status)),
                REQUEST_DURATION.labels(model, version, protocol, "success" if status == 200 else "fail"),
                QUEUE_DURATION.labels(model, version),
                COMPUTE_DURATION.labels(model, version),
                LAST_INFERENCE.labels(model, version),
            )
        children[0].inc(counts.requests)
        counts.duration.write(children[1])
        if counts.queue is not None and counts.compute is not None:
            counts.queue.write(children[2])
            counts.compute.write(children[3])
            children[4].set(counts.last_ms)


_RECORDERS: weakref.WeakSet[RequestMetrics] = weakref.WeakSet()
_SERIALS = itertools.count()
MARK_POLL_S = 0.002
MARK_LAG_S = 1.0


def flush_pending() -> None:
    """Write every batch this process holds: a read of the files then sees all of its requests."""
    for recorder in list(_RECORDERS):
        recorder.flush()


def settle() -> None:
    """Before a read: write this process's batches, and wait (at most its flush interval, plus
    ``MARK_LAG_S`` for a busy event loop) for the other processes' batches of requests
    answered before now. So /metrics and the statistics extension are exact, whichever
    frontend serves them."""
    flush_pending()
    intervals = [recorder.flush_interval_s for recorder in list(_RECORDERS)]
    await_other_writers(max(intervals, default=0.0) + MARK_LAG_S, pid_alive)


def process_registry() -> CollectorRegistry:
    """Every process's values (multiprocess mode), or this process's own when run in-process."""
    settle()
    registry = CollectorRegistry()
    directory = multiprocess_dir()
    if directory is not None and directory.is_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    else:  # single process (tests in-process): this process's own metrics
        from prometheus_client import REGISTRY

        for collector in list(REGISTRY._collector_to_names):
            with contextlib.suppress(ValueError):
                registry.register(collector)
    return registry


def exposition(snapshot: Callable[[], Any]) -> bytes:
    """The /metrics body: every process's values plus the table's."""
    registry = process_registry()
    registry.register(TableCollector(snapshot))
    return generate_latest(registry)
