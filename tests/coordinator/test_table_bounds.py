"""The model table stays bounded whatever clients ask: models per server, failed entries, metric
labels, one-model lookups, and remote fetches that stall (CoordinatorCore driven sans-IO)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from coordinator.core import Fetch, fetch_source
from coordinator.fetchpool import SourcePool
from ipc.messages import ClientLoad, ClientLookup, ClientReply, ModelConfig
from model_server import metrics
from model_server.settings import Settings

from .test_core import CLIENT, KEY, SCHEMA, World, replies

WAIT_S = 10.0  # bound on every wait in these tests (they finish in milliseconds)


def failures_by_reason() -> dict[tuple[str, ...], float]:
    """The load-failure counter's series: label values -> count."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in metrics.LOAD_FAILURES.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def lookup(world: World, model_id: str, version: str = "") -> ClientReply:
    world.core.handle_client(CLIENT, ClientLookup(99, model_id, version))
    ((_, reply),) = replies(world.take())
    return reply


# ----------------------------------------------------------------------------- models per server


def test_loads_past_max_models_answer_409_and_failed_entries_do_not_count(tmp_path: Path) -> None:
    world = World(tmp_path, max_models=2)
    world.hello(0)
    world.ready_model(("a", "1"))
    world.load(("b", "1"))
    world.take()
    world.load(("c", "1"))
    ((_, reply),) = replies(world.take())
    assert (reply.status, reply.code) == (409, "too_many_models")
    assert "MODEL_SERVER_MAX_MODELS" in reply.error
    assert ("c", "1") not in world.core.models
    # "b" fails: the slot it held is free again, its failed entry stays listed.
    world.core.on_fetch_failed(("b", "1"), 404, "not found")
    world.take()
    world.load(("c", "1"))
    assert replies(world.take()) == []  # accepted: fetching
    assert world.state(("c", "1")) == "loading"
    assert world.state(("b", "1")) == "failed"
    # Unloading frees a slot too.
    world.load(("d", "1"))
    assert replies(world.take())[0][1].status == 409
    world.unload(("a", "1"))
    world.unloaded(0, ("a", "1"))
    world.take()
    world.load(("d", "1"))
    assert replies(world.take()) == []


# ----------------------------------------------------------------------------- failed entries


def test_three_hundred_failed_loads_keep_the_table_and_metric_series_bounded(tmp_path: Path) -> None:
    world = World(tmp_path, max_failed_entries=20, failed_load_ttl_s=300.0)
    world.hello(0)
    world.ready_model()
    before = failures_by_reason()
    for i in range(300):
        key = (f"ghost-{i}", "1")
        world.load(key)
        world.core.on_fetch_failed(key, 404, f"model ghost-{i}:1 not found")
        world.clock.now += 0.01
    world.take()
    failed = [k for k, e in world.core.models.items() if e.state == "failed"]
    assert len(failed) == 20
    assert sorted(failed) == sorted((f"ghost-{i}", "1") for i in range(280, 300))  # the newest kept
    assert world.state() == "ready"  # a loaded model is never dropped
    assert len(world.core.snapshot().models) == 21
    after = failures_by_reason()
    assert set(after) <= {
        (reason,) for reason in ("not_found", "denied", "invalid", "timeout", "error")
    } | set(before)
    assert after[("not_found",)] - before.get(("not_found",), 0.0) == 300
    assert not any(label.startswith("ghost") for labels in after for label in labels)


def test_failed_entries_expire_after_their_ttl_but_start_up_models_stay(tmp_path: Path) -> None:
    world = World(tmp_path, failed_load_ttl_s=300.0)
    world.hello(0)
    world.load(("ghost", "1"))
    world.core.on_fetch_failed(("ghost", "1"), 404, "not found")
    world.load(config=ModelConfig(startup=True))
    world.core.on_fetch_failed(KEY, 502, "registry down")
    world.take()
    world.clock.now += 299.0
    world.core.tick()
    assert world.state(("ghost", "1")) == "failed"  # still visible with its reason
    assert lookup(world, "ghost", "1").entry is not None
    world.clock.now += 2.0
    world.core.tick()
    assert ("ghost", "1") not in world.core.models
    assert lookup(world, "ghost", "1").status == 404
    assert KEY in world.core.models  # a start-up model retries instead of expiring


def test_a_retried_load_leaves_the_failed_list(tmp_path: Path) -> None:
    world = World(tmp_path, failed_load_ttl_s=10.0)
    world.hello(0)
    world.load()
    world.core.on_fetch_failed(KEY, 404, "not found")
    world.load()  # retry, then it succeeds
    world.fetched()
    world.loaded(0)
    world.take()
    world.clock.now += 60.0
    world.core.tick()
    assert world.state() == "ready"
    assert world.core.failed == {}


def test_no_failed_entries_kept_when_the_cap_is_zero(tmp_path: Path) -> None:
    world = World(tmp_path, max_failed_entries=0)
    world.hello(0)
    req = world.load(("ghost", "1"))
    world.core.on_fetch_failed(("ghost", "1"), 404, "not found")
    ((_, reply),) = replies(world.take())
    assert (reply.req, reply.status) == (req, 404)  # the waiter still hears why
    assert world.core.models == {}


# ----------------------------------------------------------------------------- lookups


def test_lookup_of_an_unknown_model_answers_404_without_the_table(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.hello(0)
    world.ready_model(("m", "1"))
    world.ready_model(("m", "2"))
    world.load(("m", "3"))
    world.take()
    unknown = lookup(world, "nope")
    assert (unknown.status, unknown.code, unknown.table) == (404, "model_not_found", None)
    assert lookup(world, "m", "9").status == 404
    newest = lookup(world, "m")
    assert newest.entry is not None and newest.entry.version == "2"  # newest *ready* version
    assert newest.table is not None and len(newest.table.models) == 3  # ready: the router needs it
    loading = lookup(world, "m", "3")
    assert loading.entry is not None and loading.entry.state == "loading"
    assert loading.table is None  # not routable: no snapshot built


# ----------------------------------------------------------------------------- stalled remote fetches


def test_a_remote_fetch_without_progress_fails_504_and_its_late_result_is_dropped(tmp_path: Path) -> None:
    world = World(tmp_path, download_timeout_s=5.0, load_timeout_s=600.0)
    world.hello(0)
    world.core.handle_client(CLIENT, _load_msg(1, KEY, "s3://bucket/models/fraud/1/"))
    (first,) = world.core.fetches
    assert first.source == "s3://bucket"
    world.clock.now += 4.0
    world.core.tick()
    assert replies(world.take()) == []
    world.clock.now += 1.5
    world.core.tick()
    ((_, reply),) = replies(world.take())
    assert reply.status == 504 and "s3://bucket sent nothing for 5 s" in reply.error
    # A new load of the same model starts a fresh fetch; the first thread's late answers are stale.
    world.core.handle_client(CLIENT, _load_msg(2, KEY, "s3://bucket/models/fraud/1/"))
    second = world.core.fetches[-1]
    assert second.token != first.token
    world.core.on_fetch_failed(KEY, 504, "late", token=first.token)
    used = world.core.on_fetched(KEY, "/c/f.onnx", "ab" * 32, 1, SCHEMA, "s3://x", token=first.token)
    assert used is False
    assert world.state() == "loading" and replies(world.take()) == []
    # Bytes arriving keep a slow download alive past the stall timeout.
    for done in (100, 200, 300):
        world.clock.now += 4.0
        world.core.on_progress(KEY, done, 1000, 25.0, token=second.token)
        world.core.tick()
    assert world.state() == "downloading" and replies(world.take()) == []
    # Every byte arrived: verifying a large artifact may take longer than the stall timeout.
    world.core.on_progress(KEY, 1000, 1000, 25.0, token=second.token)
    world.clock.now += 30.0
    world.core.tick()
    assert world.state() == "downloading" and replies(world.take()) == []
    assert world.core.on_fetched(KEY, "/c/f.onnx", "ab" * 32, 1, SCHEMA, "s3://x", token=second.token)


def test_local_fetches_have_no_stall_deadline(tmp_path: Path) -> None:
    world = World(tmp_path, download_timeout_s=1.0, load_timeout_s=600.0)
    world.hello(0)
    world.load()
    (fetch,) = world.core.fetches
    assert fetch.source == ""
    world.clock.now += 30.0
    world.core.tick()
    assert world.state() == "loading" and replies(world.take()) == []


@pytest.mark.parametrize(
    ("uri", "settings", "source"),
    [
        ("/models/m/1", {}, ""),
        ("file:///models/m/1", {}, ""),
        ("s3://bucket-a/m/1/", {}, "s3://bucket-a"),
        ("models:/m/1", {}, "mlflow"),
        ("runs:/abc/model", {}, "mlflow"),
        (None, {}, ""),
        (None, {"aws_s3_bucket": "bkt"}, "s3://bkt"),
        (None, {"mlflow_tracking_uri": "http://127.0.0.1:5000"}, "mlflow"),
    ],
)
def test_fetch_source(uri: str | None, settings: dict[str, str], source: str) -> None:
    assert fetch_source(uri, Settings(**settings)) == source  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the pool


def test_source_pool_bounds_each_source_and_the_total() -> None:
    release = {name: threading.Event() for name in ("a1", "a2", "a3", "b1", "c1")}
    started: list[str] = []
    lock = threading.Lock()
    progressed = threading.Condition(lock)

    def run(fetch: Fetch) -> None:
        with progressed:
            started.append(fetch.key[0])
            progressed.notify_all()
        release[fetch.key[0]].wait(WAIT_S)

    def wait_started(count: int) -> list[str]:
        with progressed:
            assert progressed.wait_for(lambda: len(started) >= count, WAIT_S)
            return list(started)

    pool = SourcePool(total=3, per_source=2, run=run)
    try:
        for token, (name, source) in enumerate(
            [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C")], start=1
        ):
            pool.submit(Fetch((name, "1"), None, token, source))
        assert sorted(wait_started(3)) == ["a1", "a2", "b1"]  # a3 waits for A, c1 for the total
        assert pool.running() == {"A": 2, "B": 1} and pool.queued() == 2
        release["b1"].set()
        assert wait_started(4)[3] == "c1"  # B's slot went to the next source with room
        pool.retain({1, 2, 5})  # a3's load gave up while queued
        assert pool.queued() == 0
        release["a1"].set()
        release["a2"].set()
        release["c1"].set()
        deadline = time.monotonic() + WAIT_S
        while pool.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.running() == {}
        assert sorted(started) == ["a1", "a2", "b1", "c1"]  # a3 never ran
    finally:
        pool.shutdown()
        for event in release.values():
            event.set()


def _load_msg(req: int, key: tuple[str, str], uri: str) -> ClientLoad:
    return ClientLoad(req, key[0], key[1], uri, ModelConfig())
