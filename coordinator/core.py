"""The coordinator's logic: the one model table, worker liveness, loads and unloads.

Sans-IO: methods take decoded messages and the current time, and append
``(destination, message)`` pairs to ``outbox``; artifact fetches are queued in
``fetches`` for the process shell to run on threads. Tests drive it directly.

Destinations: ``("worker", index)``, ``("client", peer)``, ``("publish", None)``.

A model's life: ``downloading`` (artifact being fetched) -> ``loading``
(workers creating sessions) -> ``ready`` (at least one worker holds it) ->
``unloading`` (no new requests; workers drop it once in-flight requests finish)
-> removed. ``failed`` keeps the reason and the HTTP status that fits it; a new
load retries.

The table is bounded: at most ``max_models`` entries that are not failed (a load
past it answers 409), and failed entries expire after ``failed_load_ttl_s`` with
at most ``max_failed_entries`` kept (oldest dropped first; start-up models are
kept, they retry). A remote fetch that makes no progress for
``download_timeout_s`` fails with 504 even if its thread is still blocked in the
source's client; a late result of that thread is recognised by its token and
dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from ipc.messages import (
    ClientEnsure,
    ClientGet,
    ClientIndex,
    ClientLoad,
    ClientLookup,
    ClientReply,
    ClientRequest,
    ClientShmRegister,
    ClientShmUnregister,
    ClientUnload,
    Heartbeat,
    LoadModel,
    ModelConfig,
    ModelEntry,
    ModelLoaded,
    ModelSchema,
    ModelUnloaded,
    RepositoryItem,
    ShmRegion,
    TableSnapshot,
    UnloadModel,
    WorkerGoodbye,
    WorkerHello,
    WorkerState,
    WorkerToCoordinator,
)
from loader import policy as loader_policy
from loader.errors import LoadError
from loader.redact import strip_credentials
from model_server import metrics
from model_server.naming import version_key
from model_server.settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, str]
STARTUP_RETRY_BASE_S = 1.0
STARTUP_RETRY_MAX_S = 60.0
Destination = tuple[Literal["worker", "client", "publish"], Any]


@dataclass
class WorkerRecord:
    index: int
    pid: int
    peer: bytes
    endpoint: str
    device: str
    alive: bool = True
    last_seen: float = 0.0
    inflight: int = 0
    rss_bytes: int = 0
    models: set[Key] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    restarts: int = 0
    max_models: int = 0
    max_bytes: int = 0


@dataclass
class LoadJob:
    """A load in progress: who waits for it and which workers were asked."""

    started: float
    waiters: list[tuple[bytes, int]] = field(default_factory=list)  # (client peer, req)
    asked: set[int] = field(default_factory=set)
    failures: dict[int, tuple[str, int]] = field(default_factory=dict)
    fetching: bool = True
    token: int = 0  # of its Fetch: a result carrying another token is a stale fetch's
    source: str = ""  # remote source of the fetch ("": local, no stall deadline)
    active_at: float = 0.0  # last sign of life of a remote fetch (start, bytes arriving)
    downloaded: bool = False  # every byte arrived: checksum and ONNX checker run unhurried


@dataclass
class UnloadJob:
    waiters: list[tuple[bytes, int]] = field(default_factory=list)
    asked: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Fetch:
    """Resolve and verify an artifact (run by the shell in a thread)."""

    key: Key
    registry_uri: str | None
    token: int = field(default=0, compare=False)
    source: str = field(default="", compare=False)  # "": local (its own pool), else the remote source


def fetch_source(registry_uri: str | None, settings: Settings) -> str:
    """The remote source a fetch talks to ("" for a local path): downloads from one source share
    its concurrency bound, so one that hangs cannot hold the threads other sources need."""
    from loader.resolve import scheme_of

    if not registry_uri:  # the default source, as loader.resolve.default_uri picks it
        if settings.mlflow_tracking_uri:
            return "mlflow"
        return f"s3://{settings.aws_s3_bucket}" if settings.aws_s3_bucket else ""
    uri = registry_uri
    scheme = scheme_of(uri)
    if scheme in {"", "file"}:
        return ""
    if scheme == "s3":
        return "s3://" + uri[5:].partition("/")[0]
    if scheme in {"models", "runs", "mlflow-artifacts"}:
        return "mlflow"  # one registry, MLFLOW_TRACKING_URI
    return scheme


FAILURE_REASONS = {
    400: "invalid",
    403: "denied",
    404: "not_found",
    409: "conflict",
    422: "invalid",
    502: "source_unavailable",
    503: "unavailable",
    504: "timeout",
    507: "no_room",
}


def failure_reason(status: int) -> str:
    """A bounded label for a failed load (never the client-chosen model id)."""
    return FAILURE_REASONS.get(status, "error")


class CoordinatorCore:
    def __init__(self, settings: Settings, clock: Any = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.models: dict[Key, ModelEntry] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self.loads: dict[Key, LoadJob] = {}
        self.regions: dict[str, ShmRegion] = {}  # client shared-memory registrations (V2)
        self.retries: dict[Key, tuple[int, float]] = {}  # failed start-up models: (attempt, next try)
        self.unloads: dict[Key, UnloadJob] = {}
        self.outbox: list[tuple[Destination, Any]] = []
        self.fetches: list[Fetch] = []
        self.failed: OrderedDict[Key, float] = OrderedDict()  # failed entries that expire, oldest first
        self._tokens = 0
        self.epoch = 0
        self.load_failures = 0
        self.evictions = 0
        self._dirty = True
        self._last_publish = 0.0

    # ------------------------------------------------------------------ helpers
    def _send_worker(self, index: int, message: Any) -> None:
        self.outbox.append((("worker", index), message))

    def _reply(self, peer: bytes, message: ClientReply) -> None:
        self.outbox.append((("client", peer), message))

    def _changed(self) -> None:
        self._dirty = True

    def alive_workers(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.alive]

    def entry_out(self, entry: ModelEntry) -> ModelEntry:
        """The entry as clients see it: only live workers listed."""
        entry.workers = sorted(i for i in entry.workers if i in self.workers and self.workers[i].alive)
        return entry

    def readiness(self) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        if not self.alive_workers():
            reasons.append("no worker is alive")
        for key, entry in sorted(self.models.items()):
            if entry.config.startup and (entry.state != "ready" or not self.entry_out(entry).workers):
                detail = f" ({entry.reason})" if entry.reason else ""
                reasons.append(f"start-up model {key[0]}:{key[1]} is {entry.state}{detail}")
        return (not reasons, reasons)

    def snapshot(self) -> TableSnapshot:
        ready, reasons = self.readiness()
        return TableSnapshot(
            epoch=self.epoch,
            ready=ready,
            reasons=reasons,
            models=[self.entry_out(e) for _, e in sorted(self.models.items())],
            workers=[
                WorkerState(
                    index=w.index,
                    pid=w.pid,
                    endpoint=w.endpoint,
                    device=w.device,
                    alive=w.alive,
                    inflight=w.inflight,
                    models=[[k[0], k[1]] for k in sorted(w.models)],
                    rss_bytes=w.rss_bytes,
                    started_at=w.started_at,
                    restarts=w.restarts,
                )
                for _, w in sorted(self.workers.items())
            ],
            sent_at=time.time(),
            regions=[self.regions[name] for name in sorted(self.regions)],
            evictions=self.evictions,
        )

    def publish_if_due(self, now: float, force: bool = False) -> None:
        """Publish on change, and at least once per heartbeat interval for late subscribers."""
        if force or self._dirty or now - self._last_publish >= self.settings.heartbeat_interval_s:
            self._publish(now)

    def _publish(self, now: float) -> TableSnapshot:
        if self._dirty:
            self.epoch += 1
        self._dirty = False
        self._last_publish = now
        snapshot = self.snapshot()
        self.outbox.append((("publish", None), snapshot))
        return snapshot

    def replicas_for(self, entry: ModelEntry) -> int:
        return entry.config.replicas or self.settings.model_replicas

    def _targets(self, entry: ModelEntry) -> list[int]:
        """Workers that should load ``entry``: all alive, or the least loaded ``replicas``."""
        alive = self.alive_workers()
        want = self.replicas_for(entry)
        if not want or want >= len(alive):
            return [w.index for w in alive]
        holders = set(entry.workers)
        missing = want - len(holders & {w.index for w in alive})
        candidates = sorted(
            (w for w in alive if w.index not in holders),
            key=lambda w: (len(w.models), w.rss_bytes, w.index),
        )
        return [w.index for w in candidates[: max(0, missing)]]

    def _load_message(self, entry: ModelEntry) -> LoadModel:
        assert entry.schema is not None
        return LoadModel(entry.model_id, entry.version, entry.path, entry.config, entry.schema)

    # ------------------------------------------------------------------ clients
    def handle_client(self, peer: bytes, msg: ClientRequest) -> None:
        if isinstance(msg, ClientGet):
            self._reply(peer, ClientReply(msg.req, 200, table=self.snapshot()))
        elif isinstance(msg, ClientLookup):
            self._client_lookup(peer, msg)
        elif isinstance(msg, ClientLoad):
            self._client_load(peer, msg)
        elif isinstance(msg, ClientUnload):
            self._client_unload(peer, msg)
        elif isinstance(msg, ClientEnsure):
            self._client_ensure(peer, msg)
        elif isinstance(msg, ClientIndex):
            self._client_index(peer, msg)
        elif isinstance(msg, ClientShmRegister):
            self._shm_register(peer, msg)
        elif isinstance(msg, ClientShmUnregister):
            self._shm_unregister(peer, msg)

    def _client_lookup(self, peer: bytes, msg: ClientLookup) -> None:
        if msg.version:
            entry = self.models.get((msg.model_id, msg.version))
        else:
            # A scan, but of a table bounded by max_models + max_failed_entries.
            named = [e for (m, _), e in self.models.items() if m == msg.model_id]
            ready = [e for e in named if e.state == "ready"]
            entry = (
                max(ready, key=lambda e: version_key(e.version))
                if ready
                else min(named, key=lambda e: version_key(e.version), default=None)
            )
        if entry is None:
            what = f"{msg.model_id}:{msg.version}" if msg.version else msg.model_id
            self._reply(peer, ClientReply(msg.req, 404, f"model {what} is not loaded", "model_not_found"))
            return
        entry = self.entry_out(entry)
        table = self.snapshot() if entry.state == "ready" else None
        self._reply(peer, ClientReply(msg.req, 200, entry=entry, table=table))

    def active_models(self) -> int:
        """Entries that hold (or are about to hold) worker memory: every one but the failed."""
        return sum(1 for e in self.models.values() if e.state != "failed")

    def _shm_register(self, peer: bytes, msg: ClientShmRegister) -> None:
        region = msg.region
        if region.name in self.regions:
            self._reply(
                peer,
                ClientReply(
                    msg.req, 400, f"shared memory region '{region.name}' is already registered", "conflict"
                ),
            )
            return
        if len(self.regions) >= self.settings.max_shm_regions:
            # Each region is a row every frontend and worker keeps: a client cannot grow it without bound.
            limit = self.settings.max_shm_regions
            self._reply(
                peer,
                ClientReply(
                    msg.req,
                    400,
                    f"{limit} shared memory regions are registered, the most allowed "
                    "(MODEL_SERVER_MAX_SHM_REGIONS): unregister one first",
                    "too_many_regions",
                ),
            )
            return
        self.regions[region.name] = region
        self._regions_changed(peer, msg.req)

    def _shm_unregister(self, peer: bytes, msg: ClientShmUnregister) -> None:
        if msg.name:
            self.regions.pop(msg.name, None)
        else:
            self.regions.clear()
        self._regions_changed(peer, msg.req)

    def _regions_changed(self, peer: bytes, req: int) -> None:
        """Publish the new table before the reply leaves: by the time the client has its answer
        and reaches another frontend, that frontend has the table queued and reads it before
        resolving a region (``CoordinatorClient.catch_up``), so an unregistered region is never
        used through a frontend that has not heard of it yet."""
        self._changed()
        self._reply(peer, ClientReply(req, 200, table=self._publish(self.clock())))

    def request_load(
        self,
        model_id: str,
        version: str,
        registry_uri: str | None,
        config: ModelConfig,
        waiter: tuple[bytes, int] | None = None,
    ) -> None:
        """Start (or join) a load; ``waiter`` gets the answer when it ends."""
        key = (model_id, version)
        if registry_uri and not self._source_admitted(key, registry_uri, waiter):
            return
        entry = self.models.get(key)
        if entry is not None and self._settled_by_existing(entry, config, waiter):
            return
        # New load, or a retry of a failed one.
        if self.active_models() >= self.settings.max_models:
            message = (
                f"the server holds {self.settings.max_models} models, its limit "
                "(MODEL_SERVER_MAX_MODELS): unload one first"
            )
            log.warning("load of %s:%s refused: %s", model_id, version, message)
            self._answer(waiter, ClientReply(0, 409, message, "too_many_models"))
            return
        self._start_load(key, registry_uri, config, waiter)

    def _answer(self, waiter: tuple[bytes, int] | None, reply: ClientReply) -> None:
        """Send ``reply`` (its ``req`` replaced by the waiter's) when someone waits for it."""
        if waiter:
            reply.req = waiter[1]
            self._reply(waiter[0], reply)

    def _source_admitted(self, key: Key, registry_uri: str, waiter: tuple[bytes, int] | None) -> bool:
        """The source policy and the no-credentials rule, before the URI is stored anywhere."""
        try:
            loader_policy.admit(registry_uri, self.settings)
        except LoadError as exc:
            log.warning(
                "load of %s:%s from %s refused (%d): %s",
                key[0],
                key[1],
                strip_credentials(registry_uri),
                exc.status,
                exc.message,
            )
            self._answer(waiter, ClientReply(0, exc.status, exc.message, exc.code))
            return False
        return True

    def _settled_by_existing(
        self, entry: ModelEntry, config: ModelConfig, waiter: tuple[bytes, int] | None
    ) -> bool:
        """A load of a model in the table: refused while it unloads, answered when it is ready,
        joined while it loads. False: it failed before, so it loads again."""
        key = (entry.model_id, entry.version)
        if entry.state == "unloading":
            message = f"model {key[0]}:{key[1]} is being unloaded"
            self._answer(waiter, ClientReply(0, 409, message, "conflict"))
            return True
        if entry.state == "ready":
            if config.startup and not entry.config.startup:
                entry.config.startup = True
                self._changed()
            self._answer(waiter, ClientReply(0, 200, entry=self.entry_out(entry)))
            return True
        job = self.loads.get(key)
        if job is None:
            return False
        if waiter:  # downloading or loading: share it
            job.waiters.append(waiter)
        return True

    def _start_load(
        self, key: Key, registry_uri: str | None, config: ModelConfig, waiter: tuple[bytes, int] | None
    ) -> None:
        self.failed.pop(key, None)
        self.models[key] = ModelEntry(
            model_id=key[0],
            version=key[1],
            state="loading",
            registry_uri=registry_uri or "",
            config=config,
        )
        self._tokens += 1
        source = fetch_source(registry_uri, self.settings)
        job = LoadJob(started=self.clock(), token=self._tokens, source=source, active_at=self.clock())
        if waiter:
            job.waiters.append(waiter)
        self.loads[key] = job
        self.fetches.append(Fetch(key, registry_uri, self._tokens, source))
        self._changed()
        log.info("loading %s:%s from %s", key[0], key[1], registry_uri or "the default source")

    def _client_load(self, peer: bytes, msg: ClientLoad) -> None:
        self.request_load(msg.model_id, msg.version, msg.registry_uri, msg.config, (peer, msg.req))

    def _client_unload(self, peer: bytes, msg: ClientUnload) -> None:
        key = (msg.model_id, msg.version)
        entry = self.models.get(key)
        if entry is None:
            self._reply(peer, _not_loaded(msg.req, key))
            return
        self.start_unload(key, (peer, msg.req))

    def start_unload(self, key: Key, waiter: tuple[bytes, int] | None = None) -> None:
        entry = self.models[key]
        job = self.unloads.setdefault(key, UnloadJob())
        if waiter:
            job.waiters.append(waiter)
        if entry.state == "unloading":
            return
        entry.state = "unloading"
        load = self.loads.pop(key, None)
        if load:
            for peer, req in load.waiters:
                self._reply(
                    peer,
                    ClientReply(req, 409, f"model {key[0]}:{key[1]} was unloaded while loading", "conflict"),
                )
        # Ask every live worker: one that is mid-load acks now and is told again when its load ends.
        for worker in self.alive_workers():
            job.asked.add(worker.index)
            self._send_worker(worker.index, UnloadModel(key[0], key[1]))
        self._changed()
        self._maybe_finish_unload(key)

    def _maybe_finish_unload(self, key: Key) -> None:
        job = self.unloads.get(key)
        if job is None or job.asked:
            return
        entry = self.models.pop(key, None)
        self.failed.pop(key, None)
        del self.unloads[key]
        for worker in self.workers.values():
            worker.models.discard(key)
        if entry is not None:
            entry.workers = []
            for peer, req in job.waiters:
                self._reply(peer, ClientReply(req, 200, entry=entry))
            log.info("unloaded %s:%s", key[0], key[1])
        self._changed()

    def _client_ensure(self, peer: bytes, msg: ClientEnsure) -> None:
        """Bring back a ready model that LRU eviction removed from every worker."""
        key = (msg.model_id, msg.version)
        entry = self.models.get(key)
        if entry is None:
            self._reply(peer, _not_loaded(msg.req, key))
            return
        if self.entry_out(entry).workers and entry.state == "ready":
            self._reply(peer, ClientReply(msg.req, 200, entry=entry))
            return
        if entry.state not in {"ready", "loading"} or entry.schema is None:
            if key in self.loads:
                self.loads[key].waiters.append((peer, msg.req))
                return
            self._reply(
                peer,
                ClientReply(msg.req, 503, f"model {key[0]}:{key[1]} is {entry.state}", "model_not_ready"),
            )
            return
        job = self.loads.get(key)
        if job is None:
            job = self.loads[key] = LoadJob(started=self.clock(), fetching=False)
        job.waiters.append((peer, msg.req))
        alive = sorted(self.alive_workers(), key=lambda w: (w.inflight, len(w.models), w.index))
        if not alive:
            return  # a joining worker gets it; the load timeout bounds the wait
        if not job.asked:
            target = alive[0].index
            job.asked.add(target)
            self._send_worker(target, self._load_message(entry))

    def _client_index(self, peer: bytes, msg: ClientIndex) -> None:
        from loader.local import repository_index

        items = {
            key: RepositoryItem(name=key[0], version=key[1], state=_index_state(e.state), reason=e.reason)
            for key, e in self.models.items()
        }
        for key in repository_index(self.settings.model_repository):
            items.setdefault(
                key, RepositoryItem(name=key[0], version=key[1], state="UNAVAILABLE", reason="unloaded")
            )
        self._reply(peer, ClientReply(msg.req, 200, index=[items[k] for k in sorted(items)]))

    # ------------------------------------------------------------------ artifacts
    def _current(self, key: Key, token: int | None) -> tuple[ModelEntry, LoadJob] | None:
        """The entry and fetching job a fetch result is for; None if it is a stale fetch's."""
        entry = self.models.get(key)
        job = self.loads.get(key)
        if entry is None or job is None or not job.fetching:
            return None
        if token is not None and token != job.token:
            return None
        return entry, job

    def on_progress(self, key: Key, done: int, total: int, rate: float, token: int | None = None) -> None:
        current = self._current(key, token)
        if current is None:
            return
        entry, job = current
        if done > entry.progress.get("bytes", 0.0):
            job.active_at = self.clock()
        if total and done >= total:
            job.downloaded = True  # what follows is local work (hash, checker), bounded by load_timeout_s
        entry.state = "downloading"
        entry.progress = {
            "bytes": float(done),
            "total": float(total),
            "percent": round(100.0 * done / total, 1) if total else 0.0,
            "rate_bps": round(rate, 1),
        }
        self._changed()

    def on_fetched(
        self,
        key: Key,
        path: str,
        sha256: str,
        size: int,
        schema: ModelSchema,
        uri: str,
        token: int | None = None,
    ) -> bool:
        """Use a fetched artifact; False when nothing waits for it any more (unloaded, timed
        out, or a stale fetch), so the caller releases it."""
        current = self._current(key, token)
        if current is None:
            return False
        entry, job = current
        job.fetching = False
        entry.state = "loading"
        entry.path, entry.sha256, entry.size_bytes, entry.schema = path, sha256, size, schema
        entry.registry_uri = strip_credentials(uri)
        entry.progress = {}
        for index in self._targets(entry):
            job.asked.add(index)
            self._send_worker(index, self._load_message(entry))
        self._changed()
        return True

    def on_fetch_failed(
        self, key: Key, status: int, message: str, code: str = "load_failed", token: int | None = None
    ) -> None:
        current = self._current(key, token)
        if current is None:
            return
        entry, job = current
        del self.loads[key]
        self._fail(entry, job, status, message, code)

    def _fail(
        self, entry: ModelEntry, job: LoadJob, status: int, message: str, code: str = "load_failed"
    ) -> None:
        entry.state = "failed"
        entry.reason = message
        entry.error_status = status
        entry.progress = {}
        self.load_failures += 1
        metrics.LOAD_FAILURES.labels(failure_reason(status)).inc()
        log.warning("load of %s:%s failed (%d): %s", entry.model_id, entry.version, status, message)
        for peer, req in job.waiters:
            self._reply(peer, ClientReply(req, status, message, code, entry=entry))
        if entry.config.startup:
            # A registry that is down at boot must not leave a replica unready for ever.
            key = (entry.model_id, entry.version)
            attempt = self.retries.get(key, (0, 0.0))[0] + 1
            delay = min(STARTUP_RETRY_MAX_S, STARTUP_RETRY_BASE_S * 2 ** (attempt - 1))
            self.retries[key] = (attempt, self.clock() + delay)
            entry.reason = f"{message} (retry {attempt} in {delay:.0f} s)"
        else:
            key = (entry.model_id, entry.version)
            self.failed.pop(key, None)
            self.failed[key] = self.clock()
            self._expire_failed(self.clock())
        self._changed()

    def _expire_failed(self, now: float) -> None:
        """Drop failed entries past their time to live, and the oldest past the cap."""
        ttl, cap = self.settings.failed_load_ttl_s, self.settings.max_failed_entries
        while self.failed:
            key, failed_at = next(iter(self.failed.items()))
            if len(self.failed) <= cap and now - failed_at < ttl:
                break
            del self.failed[key]
            entry = self.models.get(key)
            if entry is not None and entry.state == "failed" and key not in self.loads:
                del self.models[key]
                self._changed()

    # ------------------------------------------------------------------ workers
    def handle_worker(self, peer: bytes, msg: WorkerToCoordinator) -> None:
        now = self.clock()
        if isinstance(msg, WorkerHello):
            self._register(peer, msg.index, msg.pid, msg.endpoint, msg.device, now)
            worker = self.workers[msg.index]
            worker.max_models, worker.max_bytes = msg.max_models, msg.max_bytes
        elif isinstance(msg, Heartbeat):
            worker = self._register(peer, msg.index, msg.pid, msg.endpoint, msg.device, now)
            worker.inflight, worker.rss_bytes = msg.inflight, msg.rss_bytes
            self._reconcile(worker, {(m[0], m[1]) for m in msg.models})
        elif isinstance(msg, ModelLoaded):
            self._on_loaded(msg)
        elif isinstance(msg, ModelUnloaded):
            self._on_unloaded(msg)
        elif isinstance(msg, WorkerGoodbye):
            leaving = self.workers.get(msg.index)
            if leaving is not None and leaving.pid == msg.pid:
                log.info("worker %d (pid %d) left: %s", msg.index, msg.pid, msg.reason)
                self._mark_dead(leaving)

    def _register(
        self, peer: bytes, index: int, pid: int, endpoint: str, device: str, now: float
    ) -> WorkerRecord:
        worker = self.workers.get(index)
        if worker is not None and worker.pid == pid:
            worker.last_seen = now
            worker.peer = peer
            if not worker.alive:
                worker.alive = True
                log.info("worker %d is back", index)
                self._replay(worker)
                self._changed()
            return worker
        restarts = 0
        if worker is not None:
            restarts = worker.restarts + 1
            log.info("worker %d restarted (pid %d -> %d)", index, worker.pid, pid)
            self._mark_dead(worker)
        else:
            log.info("worker %d joined (pid %d, %s)", index, pid, device)
        worker = WorkerRecord(index, pid, peer, endpoint, device, last_seen=now, restarts=restarts)
        self.workers[index] = worker
        self._replay(worker)
        self._changed()
        return worker

    def _replay(self, worker: WorkerRecord) -> None:
        """Bring a (re)joining worker to the current model set."""
        for key, entry in sorted(self.models.items()):
            if entry.state not in {"ready", "loading"} or entry.schema is None:
                continue
            if worker.index not in self._targets(entry):
                continue
            job = self.loads.get(key)
            if job is not None:
                job.asked.add(worker.index)
            self._send_worker(worker.index, self._load_message(entry))

    def _reconcile(self, worker: WorkerRecord, held: set[Key]) -> None:
        """Heartbeats carry the worker's truth about its sessions; align the table with it."""
        for key in held - worker.models:
            entry = self.models.get(key)
            if entry is None or entry.state == "unloading":
                if key not in self.unloads:
                    self._send_worker(worker.index, UnloadModel(key[0], key[1]))
                continue
            if key in self.loads and worker.index in self.loads[key].asked:
                continue  # its ModelLoaded is on the way
            worker.models.add(key)
            if worker.index not in entry.workers:
                entry.workers.append(worker.index)
            self._changed()
        for key in worker.models - held:
            job = self.loads.get(key)
            if job is not None and worker.index in job.asked:
                continue
            worker.models.discard(key)
            entry = self.models.get(key)
            if entry is not None and worker.index in entry.workers:
                entry.workers.remove(worker.index)
            self._changed()

    def _on_loaded(self, msg: ModelLoaded) -> None:
        key = (msg.model_id, msg.version)
        worker = self.workers.get(msg.index)
        self._forget_evicted(msg, worker)
        entry = self.models.get(key)
        if entry is None or entry.state == "unloading":
            # Loaded after the model was unloaded (or while it unloads): drop it again.
            if msg.ok:
                self._send_worker(msg.index, UnloadModel(key[0], key[1]))
        else:
            job = self.loads.get(key)
            if job is not None:
                job.asked.discard(msg.index)
            if msg.ok:
                self._loaded_on(entry, msg, worker, job)
            elif job is not None:
                self._load_failed_on(entry, msg, job)
        self._changed()

    def _forget_evicted(self, msg: ModelLoaded, worker: WorkerRecord | None) -> None:
        for evicted in msg.evicted:
            ekey = (evicted[0], evicted[1])
            self.evictions += 1
            if worker is not None:
                worker.models.discard(ekey)
            other = self.models.get(ekey)
            if other is not None and msg.index in other.workers:
                other.workers.remove(msg.index)
            log.info("worker %d evicted %s:%s (LRU)", msg.index, ekey[0], ekey[1])

    def _loaded_on(
        self, entry: ModelEntry, msg: ModelLoaded, worker: WorkerRecord | None, job: LoadJob | None
    ) -> None:
        """One worker holds the model now: the first makes it ready and answers the waiters."""
        key = (entry.model_id, entry.version)
        if worker is not None:
            worker.models.add(key)
        if msg.index not in entry.workers:
            entry.workers.append(msg.index)
        entry.memory_bytes = max(entry.memory_bytes, msg.memory_bytes)
        entry.warmup_ms = entry.warmup_ms or round(msg.warmup_ms, 2)
        if entry.state != "ready":
            self._mark_ready(entry, job, msg.index)
        if job is None:
            return
        for peer, req in job.waiters:
            self._reply(peer, ClientReply(req, 200, entry=self.entry_out(entry)))
        job.waiters.clear()
        if not job.asked:
            del self.loads[key]

    def _mark_ready(self, entry: ModelEntry, job: LoadJob | None, index: int) -> None:
        entry.state = "ready"
        entry.reason = ""
        entry.error_status = 0
        entry.loaded_at = time.time()
        if job is not None:
            entry.load_ms = round((self.clock() - job.started) * 1000, 1)
            metrics.LOAD_DURATION.labels(entry.model_id).observe(entry.load_ms / 1000)
        log.info("model %s:%s ready on worker %d", entry.model_id, entry.version, index)

    def _load_failed_on(self, entry: ModelEntry, msg: ModelLoaded, job: LoadJob) -> None:
        """One worker could not load it; when none is left to answer and none holds it, it failed."""
        key = (entry.model_id, entry.version)
        job.failures[msg.index] = (msg.error, msg.error_status or 500)
        log.warning("worker %d could not load %s:%s: %s", msg.index, key[0], key[1], msg.error)
        if job.asked:
            return
        del self.loads[key]
        if entry.state != "ready" or not self.entry_out(entry).workers:
            error, status = next(iter(job.failures.values()))
            self._fail(entry, job, status, error)

    def _on_unloaded(self, msg: ModelUnloaded) -> None:
        key = (msg.model_id, msg.version)
        worker = self.workers.get(msg.index)
        if worker is not None:
            worker.models.discard(key)
        entry = self.models.get(key)
        if entry is not None and msg.index in entry.workers:
            entry.workers.remove(msg.index)
        job = self.unloads.get(key)
        if job is not None:
            job.asked.discard(msg.index)
            self._maybe_finish_unload(key)
        self._changed()

    def _mark_dead(self, worker: WorkerRecord) -> None:
        if not worker.alive:
            return
        worker.alive = False
        for key in list(worker.models):
            entry = self.models.get(key)
            if entry is not None and worker.index in entry.workers:
                entry.workers.remove(worker.index)
        worker.models.clear()
        for key in list(self.loads):
            job = self.loads[key]
            if worker.index in job.asked:
                job.asked.discard(worker.index)
                job.failures[worker.index] = (f"worker {worker.index} died while loading", 503)
                if not job.asked and not job.fetching:
                    entry = self.models[key]
                    del self.loads[key]
                    if entry.state != "ready":
                        self._fail(entry, job, 503, f"worker {worker.index} died while loading")
        for key in list(self.unloads):
            self.unloads[key].asked.discard(worker.index)
            self._maybe_finish_unload(key)
        self._changed()

    # ------------------------------------------------------------------ time
    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for key, (_, due) in list(self.retries.items()):
            entry = self.models.get(key)
            if entry is None or entry.state == "ready":
                del self.retries[key]  # the attempt count survives a retry that fails again
            elif entry.state == "failed" and now >= due and key not in self.loads:
                log.info("retrying start-up model %s:%s", key[0], key[1])
                self.request_load(key[0], key[1], entry.registry_uri or None, entry.config)
        timeout = self.settings.heartbeat_timeout_s
        for worker in self.alive_workers():
            if now - worker.last_seen > timeout:
                log.error(
                    "worker %d (pid %d) silent for %.1f s: marking it dead", worker.index, worker.pid, timeout
                )
                self._mark_dead(worker)
        self._expire_failed(now)
        stall = self.settings.download_timeout_s
        for key in list(self.loads):
            job = self.loads[key]
            if job.fetching and job.source and not job.downloaded and now - job.active_at > stall:
                # The fetch thread may still be blocked in the source's client; its late result
                # carries a token no job has any more and is dropped.
                del self.loads[key]
                entry = self.models.get(key)
                if entry is not None:
                    self._fail(
                        entry,
                        job,
                        504,
                        f"{job.source} sent nothing for {stall:g} s "
                        "(it may not answer, or downloads from it are queued; "
                        "MODEL_SERVER_DOWNLOAD_TIMEOUT_S)",
                    )
                continue
            if now - job.started > self.settings.load_timeout_s:
                del self.loads[key]
                entry = self.models.get(key)
                if entry is not None and entry.state != "ready":
                    self._fail(
                        entry,
                        job,
                        504,
                        f"load did not finish within {self.settings.load_timeout_s:.0f} s "
                        "(raise MODEL_SERVER_LOAD_TIMEOUT_S)",
                    )
                else:
                    for peer, req in job.waiters:
                        self._reply(
                            peer, ClientReply(req, 504, "no worker could take the model in time", "timeout")
                        )
        self._heal()
        self.publish_if_due(now)

    def _heal(self) -> None:
        """Put start-up models (and models with a replica count) back on a worker when the last
        one holding them died; models LRU-evicted from every worker come back on demand instead."""
        alive = sorted(self.alive_workers(), key=lambda w: (w.inflight, len(w.models), w.index))
        if not alive:
            return
        for key, entry in self.models.items():
            if entry.state != "ready" or entry.schema is None or key in self.loads:
                continue
            if not (entry.config.startup or entry.config.replicas) or self.entry_out(entry).workers:
                continue
            log.info(
                "model %s:%s has no worker left: placing it on worker %d", key[0], key[1], alive[0].index
            )
            job = self.loads[key] = LoadJob(started=self.clock(), fetching=False)
            job.asked.add(alive[0].index)
            self._send_worker(alive[0].index, self._load_message(entry))

    def desired_models(self) -> list[dict[str, Any]]:
        """What a restarted coordinator should load again (persisted by the shell)."""
        return [
            {
                "model_id": e.model_id,
                "version": e.version,
                "registry_uri": strip_credentials(e.registry_uri) or None,
                "config": e.config,
            }
            for e in self.models.values()
            if e.state in {"ready", "loading", "downloading"}
        ]


def _not_loaded(req: int, key: Key) -> ClientReply:
    return ClientReply(req, 404, f"model {key[0]}:{key[1]} is not loaded", "model_not_found")


def _index_state(state: str) -> str:
    return {"ready": "READY", "loading": "LOADING", "downloading": "LOADING", "unloading": "UNLOADING"}.get(
        state, "UNAVAILABLE"
    )
