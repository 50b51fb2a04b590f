"""In-process tests of workers.serving.Engine: descriptors in, onnxruntime, descriptors out.

The frontend's half is played by the test: it writes inputs into a real shared-memory
arena, builds an ``InferRequest`` and reads the outputs back where the reply says they are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ipc import datatypes
from ipc.arena import SHM_DIR, Arena, Segment, SegmentCache, Slot, SpillWriter, sweep
from ipc.messages import BatchConfig, InferReply, InferRequest, ModelSchema, Status, TensorRef
from loader.inspect import inspect_model
from tests import models
from tests.models import ort_run
from workers.device import Placement
from workers.runner import ModelRunner
from workers.serving import Engine, LoadedModel
from workers.session_cache import SessionCache

CPU = Placement(gpu=None, cpus=[], intra_op_threads=1)
LINEAR = ("linear", "1")
MULTI = ("multi", "1")
FAR = 10**18  # a deadline that never passes
Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    models.linear(root / "linear.onnx", features=3, seed=11)
    models.multi_dtype(root / "multi.onnx")
    return root


@dataclass
class World:
    arena: Arena
    engine: Engine
    prefix: str
    model_dir: Path
    _seq: int = 0

    def load(self, key: tuple[str, str], file: str, batching: BatchConfig | None = None) -> LoadedModel:
        path = self.model_dir / file
        schema = inspect_model(path)
        batching = batching or BatchConfig()
        runner = ModelRunner(path, CPU, schema)
        loaded = LoadedModel(runner, schema, batching, self.engine.policy_for(schema, batching))
        self.engine.cache.put(key, loaded, runner.memory_bytes)
        return loaded

    def request(
        self,
        key: tuple[str, str],
        feeds: dict[str, Array],
        out_capacity: int = 64 * 1024,
        output_names: list[str] | None = None,
        deadline_ns: int = FAR,
        client_outputs: list[TensorRef] | None = None,
    ) -> tuple[InferRequest, list[Slot]]:
        """Write ``feeds`` into the arena as the frontend does; returns the request and its slots."""
        refs = []
        slots = []
        for name, arr in feeds.items():
            datatype = datatypes.oip_datatype(arr.dtype)
            raw = datatypes.serialize_bytes(arr) if datatype == "BYTES" else arr.tobytes()
            slot = self.arena.alloc(len(raw))
            slots.append(slot)
            self.arena.view(slot.offset, len(raw))[:] = raw
            refs.append(TensorRef(name, datatype, list(arr.shape), self.arena.name, slot.offset, len(raw)))
        out = self.arena.alloc(max(out_capacity, 1))
        slots.append(out)
        self._seq += 1
        request = InferRequest(
            seq=self._seq,
            trace_id=f"t{self._seq}",
            model_id=key[0],
            version=key[1],
            inputs=refs,
            output_names=output_names or [],
            out_segment=self.arena.name,
            out_offset=out.offset,
            out_capacity=out_capacity,
            deadline_ns=deadline_ns,
            client_outputs=client_outputs or [],
        )
        return request, slots

    def free(self, slots: list[Slot]) -> None:
        for slot in slots:
            self.arena.free(slot)

    def read(self, reply: InferReply, spill: Segment | None = None) -> dict[str, Any]:
        """Copy every output out of shared memory, wherever the reply put it."""
        out: dict[str, Any] = {}
        for ref in reply.outputs:
            if ref.segment == self.arena.name:
                raw = bytes(self.arena.view(ref.offset, ref.nbytes))
            else:
                seg = (
                    spill if spill is not None and spill.name == ref.segment else Segment.attach(ref.segment)
                )
                raw = bytes(seg.view(ref.offset, ref.nbytes))
                if seg is not spill:
                    seg.close()
            if ref.datatype == "BYTES":
                count = int(np.prod(ref.shape))
                out[ref.name] = datatypes.deserialize_bytes(raw, count).reshape(ref.shape)
            else:
                out[ref.name] = np.frombuffer(raw, dtype=datatypes.numpy_dtype(ref.datatype)).reshape(
                    ref.shape
                )
        return out

    def pins(self, key: tuple[str, str]) -> int:
        entry = self.engine.cache.get(key)
        assert entry is not None
        return entry.pins


@pytest.fixture
def world(model_dir: Path) -> Iterator[World]:
    prefix = f"msrv_unit{os.getpid()}_serving_"
    arena = Arena(prefix, 4 * 1024 * 1024)
    # The server defaults, as the worker builds them from Settings (batching off unless a model asks).
    defaults = BatchConfig(max_batch_size=0, max_queue_delay_us=500, max_queue_size=1024)
    engine = Engine(SessionCache(), SegmentCache(), SpillWriter(prefix), defaults)
    try:
        yield World(arena, engine, prefix, model_dir)
    finally:
        engine.segments.close()
        arena.close()
        leftover = sweep(prefix, only_dead=False)
        assert leftover == [], f"segments left behind: {leftover}"


def _x(rows: int, seed: int) -> Array:
    return np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)


def _one(out: list[tuple[bytes, InferReply]], peer: bytes = b"f1") -> InferReply:
    assert len(out) == 1
    assert out[0][0] == peer
    return out[0][1]


def _assert_linear(world: World, got: dict[str, Any], x: Array) -> None:
    want = ort_run(world.model_dir / "linear.onnx", {"x": x})
    assert set(got) == set(want)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["label"], want["label"])


# ----------------------------------------------------------------------------- unbatched


def test_outputs_in_the_output_slot_equal_onnxruntime(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _x(5, 0)
    request, slots = world.request(LINEAR, {"x": x})
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.OK, reply.error
    assert reply.seq == request.seq
    assert reply.spill == ""
    assert reply.batch_rows == 5
    assert [r.name for r in reply.outputs] == ["scores", "label"]
    for ref in reply.outputs:
        assert ref.segment == world.arena.name
        assert request.out_offset <= ref.offset
        assert ref.offset + ref.nbytes <= request.out_offset + request.out_capacity
        assert ref.offset % 64 == 0
    assert [r.datatype for r in reply.outputs] == ["FP32", "INT64"]
    assert [r.shape for r in reply.outputs] == [[5, 2], [5]]
    _assert_linear(world, world.read(reply), x)
    assert world.pins(LINEAR) == 0
    assert world.engine.running == 0
    world.free(slots)


def test_only_the_outputs_asked_for(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _x(3, 1)
    request, slots = world.request(LINEAR, {"x": x}, output_names=["label"])
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.OK, reply.error
    got = world.read(reply)
    assert list(got) == ["label"]
    np.testing.assert_array_equal(got["label"], ort_run(world.model_dir / "linear.onnx", {"x": x})["label"])
    world.free(slots)


def test_several_input_types_and_strings(world: World) -> None:
    world.load(MULTI, "multi.onnx")
    feeds: dict[str, Array] = {
        "count": np.array([[3], [0], [7]], dtype=np.int64),
        "amount": np.array([[1.5], [2.0], [-0.25]], dtype=np.float32),
        "flag": np.array([[True], [False], [True]]),
        "tag": np.array([["a"], [""], ["naïve ✓"]], dtype=object),
    }
    request, slots = world.request(MULTI, feeds)
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.OK, reply.error
    got = world.read(reply)
    want = ort_run(world.model_dir / "multi.onnx", feeds)
    np.testing.assert_allclose(got["total"], want["total"])
    np.testing.assert_array_equal(got["not_flag"], want["not_flag"])
    assert [[b.decode() for b in row] for row in got["tag_out"]] == want["tag_out"].tolist()
    world.free(slots)


def test_deadline_passed_before_start(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    request, slots = world.request(LINEAR, {"x": _x(1, 2)}, deadline_ns=time.monotonic_ns() - 1)
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.DEADLINE
    assert reply.outputs == []
    assert world.pins(LINEAR) == 0
    # The deadline is compared with the ``now_ns`` the shell passes.
    request, more = world.request(LINEAR, {"x": _x(1, 2)}, deadline_ns=1000)
    assert _one(world.engine.submit(b"f1", request, now_ns=1001)).status == Status.DEADLINE
    world.free(slots + more)


def test_model_not_in_cache(world: World) -> None:
    request, slots = world.request(("nope", "1"), {"x": _x(1, 3)})
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.NOT_LOADED
    assert "nope:1" in reply.error
    world.free(slots)


def test_closing_model_is_not_loaded(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    entry = world.engine.cache.get(LINEAR)
    assert entry is not None
    entry.close_after_ns = 1
    assert world.engine.cache.close_due(time.monotonic_ns()) == 1
    request, slots = world.request(LINEAR, {"x": _x(1, 3)})
    assert _one(world.engine.submit(b"f1", request)).status == Status.NOT_LOADED
    world.free(slots)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            lambda r: TensorRef(r.name, r.datatype, r.shape, r.segment, r.offset, r.nbytes - 4),
            "needs 24 bytes",
        ),
        (lambda r: TensorRef(r.name, r.datatype, [-2, 3], r.segment, r.offset, r.nbytes), "negative"),
        (lambda r: TensorRef(r.name, "BF16", r.shape, r.segment, r.offset, r.nbytes), "unsupported datatype"),
        (lambda r: TensorRef("y", r.datatype, r.shape, r.segment, r.offset, r.nbytes), "missing ['x']"),
        (lambda r: TensorRef(r.name, r.datatype, r.shape, "msrv_nosuch_segment", 0, 8), "does not exist"),
        (lambda r: TensorRef(r.name, r.datatype, [2, 6], r.segment, r.offset, 48), "Got invalid dimensions"),
    ],
    ids=["nbytes", "negative-dim", "bf16", "wrong-name", "no-segment", "wrong-shape"],
)
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_bad_input_is_bad_input(world: World, mutate: Any, fragment: str, batched: bool) -> None:
    world.load(
        LINEAR, "linear.onnx", BatchConfig(max_batch_size=8, max_queue_delay_us=0) if batched else None
    )
    request, slots = world.request(LINEAR, {"x": _x(2, 4)})
    request.inputs = [mutate(request.inputs[0])]
    out = world.engine.submit(b"f1", request) + world.engine.flush(force=True)
    reply = _one(out)
    assert reply.status == Status.BAD_INPUT
    assert fragment in reply.error
    assert world.pins(LINEAR) == 0
    world.free(slots)


# ----------------------------------------------------------------------------- where outputs go


def test_outputs_larger_than_the_slot_spill(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _x(50, 5)  # scores alone are 400 bytes
    request, slots = world.request(LINEAR, {"x": x}, out_capacity=64)
    out_slot = world.arena.view(request.out_offset, 64)
    out_slot[:] = b"\xab" * 64
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.OK, reply.error
    assert reply.spill.startswith(f"{world.prefix}w{os.getpid()}_")
    assert all(ref.segment == reply.spill for ref in reply.outputs)
    assert bytes(out_slot) == b"\xab" * 64  # nothing half-written into the small slot
    assert len(world.engine.segments) == 1  # the worker dropped its mapping of the spill: handed over
    spill = Segment.attach(reply.spill)
    try:
        _assert_linear(world, world.read(reply, spill), x)
    finally:
        spill.close()
        spill.unlink()  # the frontend's job, once read
    assert not (SHM_DIR / reply.spill).exists()
    del out_slot
    world.free(slots)


def test_outputs_into_client_regions(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    x = _x(4, 6)
    region = Segment.create(f"{world.prefix}client_{os.getpid()}", 1024)
    try:
        client = [TensorRef("label", "INT64", [4], region.name, 128, 512)]
        request, slots = world.request(LINEAR, {"x": x}, client_outputs=client)
        reply = _one(world.engine.submit(b"f1", request))
        assert reply.status == Status.OK, reply.error
        label_ref = next(r for r in reply.outputs if r.name == "label")
        assert (label_ref.segment, label_ref.offset, label_ref.nbytes) == (region.name, 128, 32)
        want = ort_run(world.model_dir / "linear.onnx", {"x": x})
        np.testing.assert_array_equal(np.frombuffer(region.view(128, 32), "<i8"), want["label"])
        scores_ref = next(r for r in reply.outputs if r.name == "scores")
        assert scores_ref.segment == world.arena.name
        _assert_linear(world, world.read(reply), x)
        world.free(slots)
    finally:
        region.close()
        region.unlink()


def test_client_region_too_small(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    region = Segment.create(f"{world.prefix}client_small", 64)
    try:
        client = [TensorRef("label", "INT64", [4], region.name, 0, 16)]
        request, slots = world.request(LINEAR, {"x": _x(4, 7)}, client_outputs=client)
        reply = _one(world.engine.submit(b"f1", request))
        assert reply.status == Status.OUTPUT_REGION
        assert "needs 32 bytes" in reply.error
        assert world.pins(LINEAR) == 0
        world.free(slots)
    finally:
        region.close()
        region.unlink()


def test_client_region_too_small_does_not_leak_a_spill(world: World) -> None:
    world.load(LINEAR, "linear.onnx")
    region = Segment.create(f"{world.prefix}client_tiny", 64)
    spills = f"{world.prefix}w{os.getpid()}_"
    try:
        client = [TensorRef("label", "INT64", [40], region.name, 0, 16)]
        # scores (320 bytes) do not fit the 64-byte slot: they go to a spill; label's region is too small.
        request, slots = world.request(LINEAR, {"x": _x(40, 8)}, out_capacity=64, client_outputs=client)
        reply = _one(world.engine.submit(b"f1", request))
        assert reply.status == Status.OUTPUT_REGION
        world.free(slots)
        if reply.spill:
            Segment.attach(reply.spill).unlink()  # what the frontend does with a named spill
        assert [n for n in os.listdir(SHM_DIR) if n.startswith(spills)] == []
    finally:
        region.close()
        region.unlink()
        sweep(spills, only_dead=False)


# ----------------------------------------------------------------------------- batching


def test_batched_requests_merge_and_split_back(world: World) -> None:
    world.load(LINEAR, "linear.onnx", BatchConfig(max_batch_size=8, max_queue_delay_us=10_000_000))
    xs = [_x(n, 10 + i) for i, n in enumerate((1, 2, 3))]
    requests = []
    slots: list[Slot] = []
    for i, x in enumerate(xs):
        request, s = world.request(LINEAR, {"x": x})
        requests.append(request)
        slots += s
        assert world.engine.submit(f"f{i}".encode(), request) == []  # queued: 6 rows < 8, delay 10 s
    assert world.engine.queued == 3
    assert world.pins(LINEAR) == 3
    assert world.engine.flush() == []  # not due yet
    out = world.engine.flush(force=True)
    assert world.engine.queued == 0
    assert [peer for peer, _ in out] == [b"f0", b"f1", b"f2"]
    for (_, reply), request, x in zip(out, requests, xs, strict=True):
        assert reply.seq == request.seq
        assert reply.status == Status.OK, reply.error
        assert reply.batch_rows == 6  # merged into one run
        got = world.read(reply)
        assert got["scores"].shape == (x.shape[0], 2)
        _assert_linear(world, got, x)
    assert world.engine.executed_batches == {6: 1}
    assert world.pins(LINEAR) == 0
    world.free(slots)


def test_batch_runs_when_full_and_caps_rows(world: World) -> None:
    world.load(LINEAR, "linear.onnx", BatchConfig(max_batch_size=4, max_queue_delay_us=10_000_000))
    xs = [_x(n, 20 + i) for i, n in enumerate((3, 1, 2, 9))]
    replies: list[InferReply] = []
    slots: list[Slot] = []
    for x in xs:
        request, s = world.request(LINEAR, {"x": x})
        slots += s
        replies += [r for _, r in world.engine.submit(b"f1", request)]
    replies += [r for _, r in world.engine.flush(force=True)]
    # Submitting only queues; the flush cuts 3+1 (the cap), then the 2, which the 9 cannot join
    # (11 > 4), and the 9, over the cap, alone.
    assert [r.batch_rows for r in replies] == [4, 4, 2, 9]
    by_seq = {r.seq: r for r in replies}
    for seq, x in enumerate(xs, start=1):
        reply = by_seq[seq]
        assert reply.status == Status.OK, reply.error
        _assert_linear(world, world.read(reply), x)
    assert world.engine.executed_batches == {4: 1, 2: 1, 9: 1}
    world.free(slots)


def test_backlog_is_one_batch_even_without_a_delay(world: World) -> None:
    """Requests already sent are all queued before a batch is cut: with no delay at all, 20
    one-row requests drained together become batches of the cap, one per flush."""
    world.load(LINEAR, "linear.onnx", BatchConfig(max_batch_size=8, max_queue_delay_us=0))
    xs = [_x(1, 50 + i) for i in range(20)]
    slots: list[Slot] = []
    requests = []
    for x in xs:
        request, s = world.request(LINEAR, {"x": x})
        slots += s
        requests.append(request)
        assert world.engine.submit(b"f1", request) == []
    assert world.engine.ready_now()
    sizes = []
    replies: dict[int, InferReply] = {}
    for _ in range(5):  # bounded: 20 rows need 3 flushes
        out = world.engine.flush()
        if not out:
            break
        sizes.append(len(out))
        replies.update((r.seq, r) for _, r in out)
    assert sizes == [8, 8, 4]
    assert world.engine.executed_batches == {8: 2, 4: 1}
    for request, x in zip(requests, xs, strict=True):
        reply = replies[request.seq]
        assert reply.status == Status.OK, reply.error
        _assert_linear(world, world.read(reply), x)
    assert world.pins(LINEAR) == 0
    world.free(slots)


def test_queue_full(world: World) -> None:
    world.load(
        LINEAR, "linear.onnx", BatchConfig(max_batch_size=64, max_queue_delay_us=10**7, max_queue_size=2)
    )
    slots: list[Slot] = []
    statuses = []
    for i in range(3):
        request, s = world.request(LINEAR, {"x": _x(1, 30 + i)})
        slots += s
        statuses += [r.status for _, r in world.engine.submit(b"f1", request)]
    assert statuses == [Status.QUEUE_FULL]
    assert world.pins(LINEAR) == 2
    assert [r.status for _, r in world.engine.flush(force=True)] == [Status.OK, Status.OK]
    assert world.pins(LINEAR) == 0
    world.free(slots)


def test_deadline_passed_in_queue(world: World) -> None:
    world.load(LINEAR, "linear.onnx", BatchConfig(max_batch_size=8, max_queue_delay_us=10**7))
    soon, s1 = world.request(LINEAR, {"x": _x(1, 40)}, deadline_ns=time.monotonic_ns() + 2_000_000)
    later, s2 = world.request(LINEAR, {"x": _x(2, 41)})
    assert world.engine.submit(b"f1", soon) == []
    assert world.engine.submit(b"f2", later) == []
    time.sleep(0.005)
    out = dict((r.seq, r) for _, r in world.engine.flush(force=True))
    assert out[soon.seq].status == Status.DEADLINE
    assert out[later.seq].status == Status.OK
    assert out[later.seq].batch_rows == 2
    _assert_linear(world, world.read(out[later.seq]), _x(2, 41))
    assert world.pins(LINEAR) == 0
    world.free(s1 + s2)


def test_unbatchable_schema_never_queues(world: World) -> None:
    loaded = world.load(MULTI, "multi.onnx", BatchConfig(max_batch_size=8, max_queue_delay_us=10**7))
    assert loaded.policy is not None  # multi's inputs and outputs all lead with N
    world.engine.cache.get(MULTI).value.policy = None  # type: ignore[union-attr]
    feeds: dict[str, Array] = {
        "count": np.array([[2]], dtype=np.int64),
        "amount": np.array([[1.5]], dtype=np.float32),
        "flag": np.array([[False]]),
        "tag": np.array([["x"]], dtype=object),
    }
    request, slots = world.request(MULTI, feeds)
    reply = _one(world.engine.submit(b"f1", request))
    assert reply.status == Status.OK
    assert world.read(reply)["total"].tolist() == [[3.0]]
    world.free(slots)


def test_policy_for_uses_defaults_and_schema(model_dir: Path) -> None:
    engine = Engine(
        SessionCache(),
        SegmentCache(),
        SpillWriter("x"),
        BatchConfig(max_batch_size=16, max_queue_delay_us=250),
    )
    batched = inspect_model(model_dir / "linear.onnx")
    assert batched.batched
    policy = engine.policy_for(batched, BatchConfig())
    assert policy is not None
    assert (policy.max_batch_size, policy.max_queue_delay_ns) == (16, 250_000)
    override = engine.policy_for(batched, BatchConfig(max_batch_size=4, preferred_batch_sizes=[4, 2]))
    assert override is not None
    assert (override.max_batch_size, override.preferred_batch_sizes) == (4, (2, 4))
    assert engine.policy_for(batched, BatchConfig(max_batch_size=1)) is None
    unbatched = ModelSchema(inputs=batched.inputs, outputs=batched.outputs, batched=False)
    assert engine.policy_for(unbatched, BatchConfig(max_batch_size=8)) is None
