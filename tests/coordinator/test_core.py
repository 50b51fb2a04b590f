"""Unit tests of coordinator.core.CoordinatorCore, driven directly (sans-IO) with a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.core import CoordinatorCore, Fetch
from ipc.messages import (
    ClientEnsure,
    ClientGet,
    ClientIndex,
    ClientLoad,
    ClientReply,
    ClientShmRegister,
    ClientShmUnregister,
    ClientUnload,
    Heartbeat,
    LoadModel,
    ModelConfig,
    ModelLoaded,
    ModelSchema,
    ModelUnloaded,
    ShmRegion,
    TableSnapshot,
    TensorSpec,
    UnloadModel,
    WorkerGoodbye,
    WorkerHello,
)
from model_server.settings import Settings

KEY = ("fraud", "1")
OTHER = ("iris", "3")
SCHEMA = ModelSchema(
    inputs=[TensorSpec("x", "FP32", [-1, 3])], outputs=[TensorSpec("y", "FP32", [-1, 2])], batched=True
)
CLIENT = b"frontend-1"
CLIENT2 = b"frontend-2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.clock = Clock()
        options: dict[str, Any] = {
            "heartbeat_timeout_s": 3.0,
            "heartbeat_interval_s": 0.5,
            "load_timeout_s": 60.0,
            "model_replicas": 0,
            "model_repository": tmp_path / "repo",
            "run_dir": tmp_path / "run",
        }
        options.update(overrides)
        self.core = CoordinatorCore(Settings(**options), clock=self.clock)
        self._req = 0

    # --- driving ------------------------------------------------------------------
    def hello(self, index: int, pid: int | None = None) -> None:
        pid = pid if pid is not None else 100 + index
        self.core.handle_worker(
            f"w{index}".encode(), WorkerHello(index, pid, f"ipc:///run/worker-{index}.ipc", "cpu:0", 0, 0)
        )

    def heartbeat(
        self, index: int, models: list[tuple[str, str]], pid: int | None = None, rss: int = 0
    ) -> None:
        pid = pid if pid is not None else 100 + index
        self.core.handle_worker(
            f"w{index}".encode(),
            Heartbeat(
                index, pid, f"ipc:///run/worker-{index}.ipc", "cpu:0", 0, rss, [list(k) for k in models]
            ),
        )

    def load(
        self, key: tuple[str, str] = KEY, peer: bytes = CLIENT, config: ModelConfig | None = None
    ) -> int:
        self._req += 1
        self.core.handle_client(peer, ClientLoad(self._req, key[0], key[1], None, config or ModelConfig()))
        return self._req

    def unload(self, key: tuple[str, str] = KEY, peer: bytes = CLIENT) -> int:
        self._req += 1
        self.core.handle_client(peer, ClientUnload(self._req, key[0], key[1]))
        return self._req

    def ensure(self, key: tuple[str, str] = KEY, peer: bytes = CLIENT) -> int:
        self._req += 1
        self.core.handle_client(peer, ClientEnsure(self._req, key[0], key[1]))
        return self._req

    def fetched(self, key: tuple[str, str] = KEY) -> None:
        self.core.on_fetched(key, f"/cache/{key[0]}.onnx", "ab" * 32, 1234, SCHEMA, f"file:///repo/{key[0]}")

    def loaded(self, index: int, key: tuple[str, str] = KEY, ok: bool = True, **kw: Any) -> None:
        self.core.handle_worker(f"w{index}".encode(), ModelLoaded(index, key[0], key[1], ok, **kw))

    def unloaded(self, index: int, key: tuple[str, str] = KEY) -> None:
        self.core.handle_worker(f"w{index}".encode(), ModelUnloaded(index, key[0], key[1], "unload"))

    def ready_model(self, key: tuple[str, str] = KEY, workers: tuple[int, ...] = (0,), **kw: Any) -> None:
        self.load(key, **kw)
        self.fetched(key)
        for index in workers:
            self.loaded(index, key)
        self.take()

    # --- reading ------------------------------------------------------------------
    def take(self) -> list[tuple[Any, Any]]:
        out = list(self.core.outbox)
        self.core.outbox.clear()
        return out

    def state(self, key: tuple[str, str] = KEY) -> str:
        return self.core.models[key].state

    def holders(self, key: tuple[str, str] = KEY) -> list[int]:
        return sorted(self.core.entry_out(self.core.models[key]).workers)


def to_workers(out: list[tuple[Any, Any]], kind: type) -> list[tuple[int, Any]]:
    return [(dest[1], msg) for dest, msg in out if dest[0] == "worker" and isinstance(msg, kind)]


def replies(out: list[tuple[Any, Any]]) -> list[tuple[bytes, ClientReply]]:
    return [(dest[1], msg) for dest, msg in out if dest[0] == "client"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# ----------------------------------------------------------------------------- loads


def test_load_flow(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.take()
    req = world.load()
    assert world.core.fetches == [Fetch(KEY, None)]
    assert world.state() == "loading"
    assert world.take() == []  # nothing to tell anyone until the artifact is fetched
    world.core.on_progress(KEY, 50, 200, 1000.0)
    assert world.state() == "downloading"
    assert world.core.models[KEY].progress["percent"] == 25.0
    world.fetched()
    out = world.take()
    loads = to_workers(out, LoadModel)
    assert sorted(i for i, _ in loads) == [0, 1]
    msg = loads[0][1]
    assert (msg.model_id, msg.version, msg.path, msg.schema) == ("fraud", "1", "/cache/fraud.onnx", SCHEMA)
    assert world.state() == "loading"
    assert world.core.models[KEY].progress == {}
    world.clock.now += 2.5
    world.loaded(0, memory_bytes=500)
    out = world.take()
    ((peer, reply),) = replies(out)
    assert peer == CLIENT
    assert (reply.req, reply.status) == (req, 200)
    assert reply.entry is not None and reply.entry.state == "ready" and reply.entry.workers == [0]
    assert world.state() == "ready"
    assert world.core.models[KEY].load_ms == 2500.0
    assert KEY in world.core.loads  # worker 1 still loading
    world.loaded(1, memory_bytes=700)
    assert replies(world.take()) == []  # answered once
    assert KEY not in world.core.loads
    assert world.holders() == [0, 1]
    assert world.core.models[KEY].memory_bytes == 700
    assert world.core.workers[0].models == {KEY}


def test_concurrent_loads_share_one_fetch(world: World) -> None:
    world.hello(0)
    r1 = world.load(peer=CLIENT)
    r2 = world.load(peer=CLIENT2)
    assert world.core.fetches == [Fetch(KEY, None)]
    world.fetched()
    assert len(to_workers(world.take(), LoadModel)) == 1
    world.loaded(0)
    got = {(peer, reply.req, reply.status) for peer, reply in replies(world.take())}
    assert got == {(CLIENT, r1, 200), (CLIENT2, r2, 200)}
    # A load of a ready model answers at once, without a fetch.
    r3 = world.load()
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (r3, 200)
    assert len(world.core.fetches) == 1


def test_fetch_failure_then_retry(world: World) -> None:
    world.hello(0)
    r1 = world.load()
    r2 = world.load(peer=CLIENT2)
    world.core.on_fetch_failed(KEY, 404, "model fraud:1 not found in s3://models")
    out = replies(world.take())
    assert {(p, r.req, r.status, r.code) for p, r in out} == {
        (CLIENT, r1, 404, "load_failed"),
        (CLIENT2, r2, 404, "load_failed"),
    }
    assert all(r.error == "model fraud:1 not found in s3://models" for _, r in out)
    entry = world.core.models[KEY]
    assert (entry.state, entry.error_status, entry.reason) == (
        "failed",
        404,
        "model fraud:1 not found in s3://models",
    )
    assert world.core.load_failures == 1
    assert KEY not in world.core.loads
    # A new load retries from the start.
    r3 = world.load()
    assert world.core.fetches == [Fetch(KEY, None), Fetch(KEY, None)]
    assert world.state() == "loading"
    world.fetched()
    world.loaded(0)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (r3, 200)
    assert world.core.models[KEY].reason == ""


def test_every_worker_failing_fails_the_load(world: World) -> None:
    world.hello(0)
    world.hello(1)
    req = world.load()
    world.fetched()
    world.take()
    world.loaded(0, ok=False, error="worker budget is full", error_status=507)
    assert replies(world.take()) == []  # worker 1 may still succeed
    world.loaded(1, ok=False, error="worker budget is full", error_status=507)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status, reply.error) == (req, 507, "worker budget is full")
    assert world.state() == "failed"


def test_one_worker_failing_is_still_ready(world: World) -> None:
    world.hello(0)
    world.hello(1)
    req = world.load()
    world.fetched()
    world.loaded(0, ok=False, error="onnxruntime cannot load the model", error_status=422)
    world.loaded(1)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 200)
    assert world.state() == "ready"
    assert world.holders() == [1]


def test_load_timeout(tmp_path: Path) -> None:
    world = World(tmp_path, heartbeat_timeout_s=1000.0)
    world.hello(0)
    req = world.load()
    world.fetched()
    world.take()
    world.clock.now += 59
    world.core.tick(world.clock.now)
    assert replies(world.take()) == []
    world.clock.now += 2
    world.core.tick(world.clock.now)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 504)
    assert "MODEL_SERVER_LOAD_TIMEOUT_S" in reply.error
    assert world.state() == "failed"


def test_failed_startup_model_is_retried(world: World) -> None:
    world.hello(0)
    world.load(config=ModelConfig(startup=True))
    world.load(OTHER)  # not a start-up model: never retried on its own
    world.core.on_fetch_failed(KEY, 502, "S3 is down")
    world.core.on_fetch_failed(OTHER, 502, "S3 is down")
    assert world.core.fetches == [Fetch(KEY, None), Fetch(OTHER, None)]
    world.clock.now += 0.5
    world.core.tick(world.clock.now)
    assert len(world.core.fetches) == 2  # not due yet
    world.clock.now += 0.5
    world.core.tick(world.clock.now)
    assert world.core.fetches[2:] == [Fetch(KEY, None)]
    assert world.state() == "loading"
    assert world.state(OTHER) == "failed"
    world.fetched()
    world.loaded(0)
    world.core.tick(world.clock.now + 100)
    assert world.state() == "ready"
    assert len(world.core.fetches) == 3
    assert world.core.retries == {}


def test_startup_retry_backs_off(world: World) -> None:
    world.hello(0)
    world.load(config=ModelConfig(startup=True))
    world.core.on_fetch_failed(KEY, 502, "S3 is down")
    assert world.core.models[KEY].reason.endswith("(retry 1 in 1 s)")
    world.clock.now += 1
    world.core.tick(world.clock.now)  # the retry starts
    world.core.tick(world.clock.now + 0.1)  # the shell ticks while the fetch runs
    world.core.on_fetch_failed(KEY, 502, "S3 is down")
    assert world.core.models[KEY].reason.endswith("(retry 2 in 2 s)")


# ----------------------------------------------------------------------------- workers


def test_worker_restart_replays_ready_models(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(workers=(0, 1))
    world.ready_model(OTHER, workers=(0, 1))
    assert world.holders() == [0, 1]
    world.hello(1, pid=999)  # supervisord restarted worker 1
    out = world.take()
    replayed = to_workers(out, LoadModel)
    assert sorted((i, (m.model_id, m.version)) for i, m in replayed) == [(1, KEY), (1, OTHER)]
    assert world.holders() == [0]  # the new process holds nothing yet
    record = world.core.workers[1]
    assert (record.pid, record.restarts, record.alive) == (999, 1, True)
    world.core.publish_if_due(world.clock.now)
    (snap,) = [m for dest, m in world.take() if dest[0] == "publish"]
    assert [(w.index, w.pid, w.restarts, w.models) for w in snap.workers] == [
        (0, 100, 0, [["fraud", "1"], ["iris", "3"]]),
        (1, 999, 1, []),
    ]
    world.loaded(1)
    world.loaded(1, OTHER)
    assert world.holders() == [0, 1]
    assert world.holders(OTHER) == [0, 1]


def test_heartbeat_timeout_marks_worker_dead(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(workers=(0, 1))
    world.clock.now += 2.0
    world.heartbeat(0, [KEY])
    world.clock.now += 1.5  # worker 1 silent for 3.5 s, worker 0 for 1.5 s
    world.core.tick(world.clock.now)
    assert world.core.workers[1].alive is False
    assert world.core.workers[0].alive is True
    assert world.holders() == [0]
    assert world.core.workers[1].models == set()
    snap = world.core.snapshot()
    assert [w.alive for w in snap.workers] == [True, False]
    assert snap.models[0].workers == [0]
    # The same process speaking again is welcomed back and told what to hold.
    world.take()
    world.heartbeat(1, [KEY])
    assert world.core.workers[1].alive is True
    assert [i for i, _ in to_workers(world.take(), LoadModel)] == [1]


def test_goodbye_marks_dead_only_for_the_same_pid(world: World) -> None:
    world.hello(0)
    world.ready_model()
    world.core.handle_worker(b"w0", WorkerGoodbye(0, 555, "shutdown"))  # a stale predecessor
    assert world.core.workers[0].alive
    world.core.handle_worker(b"w0", WorkerGoodbye(0, 100, "recycle"))
    assert not world.core.workers[0].alive
    assert world.holders() == []


def test_worker_death_while_loading_fails_the_load(world: World) -> None:
    world.hello(0)
    req = world.load()
    world.fetched()
    world.take()
    world.clock.now += 10
    world.core.tick(world.clock.now)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 503)
    assert "worker 0 died while loading" in reply.error
    assert world.state() == "failed"


def test_heartbeat_reconciliation(world: World) -> None:
    world.hello(0)
    world.ready_model()
    world.take()
    # The worker holds a model the table lacks (the coordinator restarted, or an unload got lost).
    world.heartbeat(0, [KEY, ("ghost", "7")])
    out = to_workers(world.take(), UnloadModel)
    assert [(i, (m.model_id, m.version)) for i, m in out] == [(0, ("ghost", "7"))]
    assert world.holders() == [0]
    # The worker no longer holds a model the table says it has (evicted, lost): drop it from holders.
    world.heartbeat(0, [])
    assert world.holders() == []
    assert world.core.workers[0].models == set()
    # And it reports one the table knows but did not place there: the table learns it.
    world.heartbeat(0, [KEY])
    assert world.holders() == [0]


def test_restarted_coordinator_learns_workers_from_heartbeats(world: World) -> None:
    world.heartbeat(0, [KEY], rss=123)
    record = world.core.workers[0]
    assert (record.pid, record.rss_bytes, record.alive) == (100, 123, True)
    # A model unknown to this coordinator is unloaded from the worker.
    assert [m.model_id for _, m in to_workers(world.take(), UnloadModel)] == ["fraud"]


def test_replicas_one_goes_to_the_least_loaded_worker(world: World) -> None:
    for index in range(3):
        world.hello(index)
    world.ready_model(OTHER, workers=(0, 1, 2))
    world.heartbeat(0, [OTHER], rss=5000)
    world.heartbeat(1, [OTHER], rss=100)
    world.heartbeat(2, [OTHER], rss=900)
    world.take()
    world.load(config=ModelConfig(replicas=1))
    world.fetched()
    loads = to_workers(world.take(), LoadModel)
    assert [i for i, _ in loads] == [1]  # equal model counts: the smallest resident size
    world.loaded(1)
    assert world.holders() == [1]
    # A later joiner is not given the model: it already has its one replica.
    world.hello(3)
    assert [m.model_id for i, m in to_workers(world.take(), LoadModel)] == ["iris"]


def test_server_replicas_setting(tmp_path: Path) -> None:
    world = World(tmp_path, model_replicas=2)
    for index in range(3):
        world.hello(index)
    world.ready_model(OTHER, workers=(0,))  # worker 0 holds one model already
    world.take()
    world.load()
    world.fetched()
    assert sorted(i for i, _ in to_workers(world.take(), LoadModel)) == [1, 2]


def test_lru_evictions_remove_holders(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(OTHER, workers=(0, 1))
    world.load()
    world.fetched()
    world.take()
    world.loaded(0, evicted=[list(OTHER)])
    world.loaded(1)
    assert world.holders(OTHER) == [1]
    assert world.core.workers[0].models == {KEY}
    assert world.core.evictions == 1
    assert world.state(OTHER) == "ready"


def test_ensure_places_an_evicted_model_once(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(workers=(0, 1))
    world.ready_model(OTHER, workers=(0, 1))
    world.heartbeat(0, [OTHER])  # both workers evicted KEY: it has no holder now
    world.heartbeat(1, [OTHER])
    assert world.holders() == []
    world.take()
    r1 = world.ensure()
    r2 = world.ensure(peer=CLIENT2)
    loads = to_workers(world.take(), LoadModel)
    assert len(loads) == 1
    assert loads[0][1].path == "/cache/fraud.onnx"
    target = loads[0][0]
    world.loaded(target)
    got = {(p, r.req, r.status) for p, r in replies(world.take())}
    assert got == {(CLIENT, r1, 200), (CLIENT2, r2, 200)}
    assert world.holders() == [target]
    # Ensure on a model that has holders answers at once.
    r3 = world.ensure()
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (r3, 200)
    assert to_workers(world.core.outbox, LoadModel) == []


def test_ensure_unknown_model_is_404(world: World) -> None:
    world.hello(0)
    req = world.ensure()
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status, reply.code) == (req, 404, "model_not_found")


def test_ensure_with_no_worker_times_out(world: World) -> None:
    world.hello(0)
    world.ready_model()
    world.core.handle_worker(b"w0", WorkerGoodbye(0, 100, "shutdown"))
    world.take()
    req = world.ensure()
    assert to_workers(world.take(), LoadModel) == []
    world.clock.now += 61
    world.core.tick(world.clock.now)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 504)
    assert world.state() == "ready"  # still wanted; the next worker to join gets it


# ----------------------------------------------------------------------------- unloads


def test_unload_waits_for_every_asked_worker(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(workers=(0, 1))
    req = world.unload()
    out = world.take()
    assert sorted(i for i, _ in to_workers(out, UnloadModel)) == [0, 1]
    assert replies(out) == []
    assert world.state() == "unloading"
    # A load while unloading is a conflict.
    conflict = world.load()
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (conflict, 409)
    world.unloaded(1)
    assert replies(world.take()) == []
    assert world.state() == "unloading"
    world.unloaded(0)
    ((peer, reply),) = replies(world.take())
    assert (peer, reply.req, reply.status) == (CLIENT, req, 200)
    assert KEY not in world.core.models
    assert world.core.workers[0].models == set() and world.core.workers[1].models == set()


def test_unload_completes_when_an_asked_worker_dies(world: World) -> None:
    world.hello(0)
    world.hello(1)
    world.ready_model(workers=(0, 1))
    req = world.unload()
    world.unloaded(0)
    world.take()
    world.clock.now += 10
    world.heartbeat(0, [])
    world.core.tick(world.clock.now)  # worker 1 silent: dead, nothing left to wait for
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 200)
    assert KEY not in world.core.models


def test_unload_unknown_is_404_and_unload_during_fetch(world: World) -> None:
    world.hello(0)
    missing = world.unload()
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (missing, 404)
    loading = world.load()
    unloading = world.unload(peer=CLIENT2)
    out = replies(world.take())
    assert (CLIENT, loading, 409) in {(p, r.req, r.status) for p, r in out}
    world.unloaded(0)
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (unloading, 200)
    world.fetched()  # the fetch ends after the unload: ignored
    assert KEY not in world.core.models
    assert to_workers(world.take(), LoadModel) == []


def test_late_load_of_an_unloading_model_is_undone(world: World) -> None:
    world.hello(0)
    world.load()
    world.fetched()
    world.take()
    world.unload()
    world.take()
    world.loaded(0)  # the worker finished loading after the unload was asked
    assert [m.model_id for _, m in to_workers(world.take(), UnloadModel)] == ["fraud"]


# ----------------------------------------------------------------------------- readiness and table


def test_readiness_reasons(tmp_path: Path) -> None:
    world = World(tmp_path)
    assert world.core.readiness() == (False, ["no worker is alive"])
    world.hello(0)
    assert world.core.readiness() == (True, [])
    world.load(config=ModelConfig(startup=True))
    ready, reasons = world.core.readiness()
    assert not ready
    assert reasons == ["start-up model fraud:1 is loading"]
    world.core.on_fetch_failed(KEY, 502, "S3 is down")
    assert world.core.readiness()[1] == ["start-up model fraud:1 is failed (S3 is down (retry 1 in 1 s))"]
    world.load(config=ModelConfig(startup=True))
    world.fetched()
    world.loaded(0)
    assert world.core.readiness() == (True, [])
    snap = world.core.snapshot()
    assert (snap.ready, snap.reasons) == (True, [])


def test_readiness_needs_a_live_holder_of_startup_models(world: World) -> None:
    world.hello(0)
    world.ready_model(config=ModelConfig(startup=True))
    assert world.core.readiness() == (True, [])
    world.clock.now += 5
    world.core.tick(world.clock.now)
    ready, reasons = world.core.readiness()
    assert not ready
    assert "no worker is alive" in reasons
    assert "start-up model fraud:1 is ready" in reasons


def test_publish_on_change_and_periodically(world: World) -> None:
    world.core.publish_if_due(world.clock.now)
    first = [m for dest, m in world.take() if dest[0] == "publish"]
    assert len(first) == 1 and isinstance(first[0], TableSnapshot)
    world.core.publish_if_due(world.clock.now + 0.1)
    assert world.take() == []  # nothing changed, not due
    world.hello(0)
    world.take()
    world.core.publish_if_due(world.clock.now + 0.2)
    (snap,) = [m for dest, m in world.take() if dest[0] == "publish"]
    assert snap.epoch == first[0].epoch + 1
    assert [w.index for w in snap.workers] == [0]
    world.core.publish_if_due(world.clock.now + 1.0)
    (again,) = [m for dest, m in world.take() if dest[0] == "publish"]
    assert again.epoch == snap.epoch  # periodic, unchanged


def test_client_get_and_index(world: World, tmp_path: Path) -> None:
    (tmp_path / "repo" / "onlyondisk" / "2").mkdir(parents=True)
    (tmp_path / "repo" / "onlyondisk" / "2" / "model.onnx").write_bytes(b"x")
    world.hello(0)
    world.ready_model()
    world.core.handle_client(CLIENT, ClientGet(41))
    ((_, reply),) = replies(world.take())
    assert reply.req == 41 and reply.table is not None
    assert [(m.model_id, m.state) for m in reply.table.models] == [("fraud", "ready")]
    world.core.handle_client(CLIENT, ClientIndex(42))
    ((_, reply),) = replies(world.take())
    assert [(i.name, i.version, i.state) for i in reply.index] == [
        ("fraud", "1", "READY"),
        ("onlyondisk", "2", "UNAVAILABLE"),
    ]


def test_shared_memory_registry(world: World) -> None:
    region = ShmRegion("in0", "client_in0", 0, 4096)
    world.core.handle_client(CLIENT, ClientShmRegister(1, region))
    ((_, reply),) = replies(world.take())
    assert reply.status == 200 and reply.table is not None and reply.table.regions == [region]
    world.core.handle_client(CLIENT, ClientShmRegister(2, ShmRegion("in0", "other", 0, 64)))
    ((_, reply),) = replies(world.take())
    assert (reply.status, reply.code) == (400, "conflict")
    world.core.handle_client(CLIENT, ClientShmRegister(3, ShmRegion("out0", "client_out0", 0, 64)))
    world.core.handle_client(CLIENT, ClientShmUnregister(4, "in0"))
    assert [r.name for r in world.core.snapshot().regions] == ["out0"]
    world.core.handle_client(CLIENT, ClientShmUnregister(5, ""))
    assert world.core.snapshot().regions == []


def test_region_changes_are_published_before_they_are_answered(world: World) -> None:
    """Another frontend must have the new table queued before the client has its answer."""
    world.take()
    world.core.handle_client(CLIENT, ClientShmRegister(1, ShmRegion("in0", "client_in0", 0, 64)))
    world.core.handle_client(CLIENT, ClientShmUnregister(2, "in0"))
    out = world.take()
    kinds = [target[0] for target, _ in out]
    assert kinds == ["publish", "client", "publish", "client"]
    published_regions = [[r.name for r in msg.regions] for target, msg in out if target[0] == "publish"]
    assert published_regions == [["in0"], []]
    answered = [msg.table.epoch for target, msg in out if target[0] == "client"]
    assert answered == [msg.epoch for target, msg in out if target[0] == "publish"]


def test_shared_memory_registrations_are_capped(tmp_path: Path) -> None:
    world = World(tmp_path, max_shm_regions=2)
    for i in range(2):
        world.core.handle_client(CLIENT, ClientShmRegister(i, ShmRegion(f"r{i}", f"client_r{i}", 0, 64)))
    world.core.handle_client(CLIENT, ClientShmRegister(9, ShmRegion("r2", "client_r2", 0, 64)))
    statuses = [(reply.status, reply.code) for _, reply in replies(world.take())]
    assert statuses == [(200, ""), (200, ""), (400, "too_many_regions")]
    assert [r.name for r in world.core.snapshot().regions] == ["r0", "r1"]
    # Room again once one is unregistered.
    world.core.handle_client(CLIENT, ClientShmUnregister(10, "r0"))
    world.core.handle_client(CLIENT, ClientShmRegister(11, ShmRegion("r2", "client_r2", 0, 64)))
    assert [r.name for r in world.core.snapshot().regions] == ["r1", "r2"]


def test_desired_models(world: World) -> None:
    world.hello(0)
    world.ready_model(config=ModelConfig(startup=True))
    world.load(OTHER)
    world.core.on_fetch_failed(OTHER, 404, "nope")
    desired = world.core.desired_models()
    assert [(d["model_id"], d["version"], d["config"].startup) for d in desired] == [("fraud", "1", True)]
