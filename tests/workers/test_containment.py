"""A worker never dies of a request: the Engine answers every failure with an error reply.

In-process, with real onnxruntime sessions and real shared memory (the frontend's half
is played by ``tests.workers.test_serving.World``). Client regions are real files under
/dev/shm, truncated, swapped for a directory or a symlink as an attacker would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ipc import client_shm
from ipc.arena import SHM_DIR, Arena, SegmentCache, Slot, SpillWriter, sweep
from ipc.messages import BatchConfig, InferReply, Status, TensorRef
from tests import fault_models, models
from tests.models import ort_run
from tests.workers.test_serving import World
from workers.serving import Engine
from workers.session_cache import SessionCache

LINEAR = ("linear", "1")
MULTI = ("multi", "1")
LOOKUP = ("lookup", "1")
SEQUENCE = ("sequence", "1")
BATCHING = BatchConfig(max_batch_size=16, max_queue_delay_us=10_000_000)
Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("containment")
    models.linear(root / "linear.onnx", features=3, seed=3)
    models.multi_dtype(root / "multi.onnx")
    fault_models.lookup(root / "lookup.onnx")
    fault_models.sequence(root / "sequence.onnx")
    return root


@pytest.fixture
def world(model_dir: Path) -> Iterator[World]:
    # The server's own segments carry the instance prefix; anything else is a client's region.
    prefix = f"msrv_unit{os.getpid()}_contain_"
    arena = Arena(prefix, 4 * 1024 * 1024)
    defaults = BatchConfig(max_batch_size=0, max_queue_delay_us=500, max_queue_size=1024)
    engine = Engine(SessionCache(), SegmentCache(prefix), SpillWriter(prefix), defaults)
    try:
        yield World(arena, engine, prefix, model_dir)
    finally:
        engine.segments.close()
        arena.close()
        leftover = sweep(prefix, only_dead=False)
        assert leftover == [], f"segments left behind: {leftover}"


@pytest.fixture
def region_name() -> Iterator[str]:
    """A client's /dev/shm name (not the server's prefix), removed whatever the test left there."""
    name = f"unitclient{os.getpid()}_{os.urandom(3).hex()}"
    try:
        yield name
    finally:
        path = SHM_DIR / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            path.rmdir()


def _replies(out: list[tuple[bytes, InferReply]]) -> dict[int, InferReply]:
    return {reply.seq: reply for _, reply in out}


def _linear_x(rows: int, seed: int) -> Array:
    return np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- zero rows


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_zero_rows_answer_zero_row_outputs_like_onnxruntime(world: World, batched: bool) -> None:
    world.load(LINEAR, "linear.onnx", BATCHING if batched else None)
    x = np.zeros((0, 3), dtype=np.float32)
    request, slots = world.request(LINEAR, {"x": x})
    out = world.engine.submit(b"f1", request) + world.engine.flush(force=True)
    reply = _replies(out)[request.seq]
    assert reply.status == Status.OK, reply.error
    got = world.read(reply)
    want = ort_run(world.model_dir / "linear.onnx", {"x": x})
    for name in ("scores", "label"):
        assert got[name].shape == want[name].shape
        assert got[name].dtype == want[name].dtype
    assert world.pins(LINEAR) == 0
    world.free(slots)


def test_zero_rows_of_every_type_including_strings(world: World) -> None:
    world.load(MULTI, "multi.onnx")
    feeds: dict[str, Array] = {
        "count": np.zeros((0, 1), dtype=np.int64),
        "amount": np.zeros((0, 1), dtype=np.float32),
        "flag": np.zeros((0, 1), dtype=np.bool_),
        "tag": np.zeros((0, 1), dtype=object),
    }
    request, slots = world.request(MULTI, feeds)
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.OK, reply.error
    got = world.read(reply)
    want = ort_run(world.model_dir / "multi.onnx", feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    world.free(slots)


# ----------------------------------------------------------------------------- failures contained


def test_a_bad_request_merged_into_a_batch_fails_alone(world: World) -> None:
    """The batch fails in onnxruntime; its requests are retried one by one, so only the culprit fails."""
    world.load(LOOKUP, "lookup.onnx", BATCHING)
    feeds = [np.array([[0], [3]]), np.array([[9]]), np.array([[-1], [1], [2]])]
    requests = []
    slots: list[Slot] = []
    for i, idx in enumerate(feeds):
        request, s = world.request(LOOKUP, {"idx": idx.astype(np.int64)})
        requests.append(request)
        slots += s
        assert world.engine.submit(f"f{i}".encode(), request) == []  # queued for one batch
    replies = _replies(world.engine.flush(force=True))
    bad = replies[requests[1].seq]
    assert bad.status == Status.BAD_INPUT
    assert "out of data bounds" in bad.error
    for i in (0, 2):
        reply = replies[requests[i].seq]
        assert reply.status == Status.OK, reply.error
        want = ort_run(world.model_dir / "lookup.onnx", {"idx": feeds[i].astype(np.int64)})
        np.testing.assert_array_equal(world.read(reply)["value"], want["value"])
    assert world.pins(LOOKUP) == 0
    assert world.engine.running == 0
    world.free(slots)


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_an_unexpected_exception_is_an_internal_error_and_the_engine_serves_on(
    world: World, batched: bool
) -> None:
    """The sequence model's output makes the worker's encoding raise TypeError (it killed the worker)."""
    world.load(SEQUENCE, "sequence.onnx", BATCHING if batched else None)
    world.load(LINEAR, "linear.onnx")
    x = np.ones((2, 1), dtype=np.float32)
    first, s1 = world.request(SEQUENCE, {"x": x})
    second, s2 = world.request(SEQUENCE, {"x": x})
    out = world.engine.submit(b"f1", first) + world.engine.submit(b"f2", second)
    out += world.engine.flush(force=True)
    replies = _replies(out)
    assert [replies[r.seq].status for r in (first, second)] == [Status.INTERNAL, Status.INTERNAL]
    assert "TypeError" in replies[first.seq].error
    assert world.pins(SEQUENCE) == 0
    assert world.engine.running == 0
    assert world.engine.queued == 0
    # The same engine answers the next request.
    lx = _linear_x(3, 5)
    request, s3 = world.request(LINEAR, {"x": lx})
    reply = _replies(world.engine.submit(b"f3", request))[request.seq]
    assert reply.status == Status.OK, reply.error
    want = ort_run(world.model_dir / "linear.onnx", {"x": lx})
    np.testing.assert_allclose(world.read(reply)["scores"], want["scores"], rtol=1e-6)
    world.free(s1 + s2 + s3)


# ----------------------------------------------------------------------------- client regions


def _client_region(name: str, data: bytes, size: int) -> None:
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _region_input(world: World, name: str, x: Array, offset: int = 0) -> TensorRef:
    return TensorRef("x", "FP32", list(x.shape), name, offset, x.nbytes)


def test_client_region_input_is_read_and_equals_onnxruntime(world: World, region_name: str) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _linear_x(4, 7)
    _client_region(region_name, x.tobytes(), 4096)
    request, slots = world.request(LINEAR, {"x": x})
    request.inputs = [_region_input(world, region_name, x)]
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.OK, reply.error
    want = ort_run(world.model_dir / "linear.onnx", {"x": x})
    np.testing.assert_allclose(world.read(reply)["scores"], want["scores"], rtol=1e-6)
    world.free(slots)


def test_truncated_client_region_is_bad_input_not_sigbus(world: World, region_name: str) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _linear_x(4, 8)
    _client_region(region_name, b"", 64 * 1024)
    request, slots = world.request(LINEAR, {"x": x})
    request.inputs = [_region_input(world, region_name, x, offset=32 * 1024)]
    os.truncate(SHM_DIR / region_name, 4096)
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.BAD_INPUT
    assert "exceeds shared memory object" in reply.error
    # An output region truncated under the worker: an error reply, and nothing written.
    label = [TensorRef("label", "INT64", [4], region_name, 32 * 1024, 512)]
    request, more = world.request(LINEAR, {"x": x}, client_outputs=label)
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.OUTPUT_REGION
    assert os.stat(SHM_DIR / region_name).st_size == 4096
    world.free(slots + more)


def test_directory_in_place_of_a_region_is_bad_input(world: World, region_name: str) -> None:
    world.load(LINEAR, "linear.onnx")
    os.mkdir(SHM_DIR / region_name)
    x = _linear_x(2, 9)
    request, slots = world.request(LINEAR, {"x": x})
    request.inputs = [_region_input(world, region_name, x)]
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.BAD_INPUT
    assert "cannot be opened" in reply.error
    world.free(slots)


def test_symlink_in_place_of_a_region_is_not_followed(world: World, region_name: str, tmp_path: Path) -> None:
    world.load(LINEAR, "linear.onnx")
    target = tmp_path / "precious"
    target.write_bytes(b"do not overwrite me" * 20)
    before = target.read_bytes()
    os.symlink(target, SHM_DIR / region_name)
    x = _linear_x(2, 10)
    label = [TensorRef("label", "INT64", [2], region_name, 0, 16)]
    request, slots = world.request(LINEAR, {"x": x}, client_outputs=label)
    reply = _replies(world.engine.submit(b"f1", request))[request.seq]
    assert reply.status == Status.OUTPUT_REGION
    assert target.read_bytes() == before
    request, more = world.request(LINEAR, {"x": x})
    request.inputs = [_region_input(world, region_name, x)]
    assert _replies(world.engine.submit(b"f1", request))[request.seq].status == Status.BAD_INPUT
    world.free(slots + more)


def test_object_names_are_plain_names_under_dev_shm() -> None:
    assert client_shm.object_name("/abc_1.x", 128) == "abc_1.x"
    assert client_shm.object_name("abc", 128) == "abc"
    for bad in ("/a/b", "/../etc/passwd", "/..", "/.", "/", "", "/a..b", "/a b", "/" + "x" * 129):
        with pytest.raises(client_shm.RegionError):
            client_shm.object_name(bad, 128)
