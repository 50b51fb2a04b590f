"""The frontend's dispatcher against a real worker Engine over a real ZeroMQ ROUTER, in one process.

The worker is played by two threads, as in the worker process: an I/O thread owning the
ROUTER socket (routing id ``w0``, bound at ``ipc://<run dir>/worker-0.ipc``) and a compute
thread running ``workers.serving.Engine``. The dispatcher runs in ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from frontend.dispatcher import (
    UNKNOWN_OUTPUT_BYTES,
    CallInput,
    Dispatcher,
    estimate_output_bytes,
)
from frontend.errors import ApiError
from ipc import endpoints
from ipc.arena import SHM_DIR, SegmentCache, SpillWriter, sweep
from ipc.messages import (
    BatchConfig,
    InferReply,
    InferRequest,
    ModelEntry,
    ModelSchema,
    TensorSpec,
    encode,
    infer_request_decoder,
)
from loader.inspect import inspect_model
from tests import models
from tests.models import ort_run
from workers.device import Placement
from workers.runner import ModelRunner
from workers.serving import Engine, LoadedModel
from workers.session_cache import SessionCache

CPU = Placement(gpu=None, cpus=[], intra_op_threads=1)
MiB = 1024 * 1024

# ----------------------------------------------------------------------------- estimate_output_bytes


def _schema(*outputs: TensorSpec) -> ModelSchema:
    return ModelSchema(inputs=[TensorSpec("x", "FP32", [-1, 3])], outputs=list(outputs))


def test_estimate_exact_when_only_the_batch_dim_varies() -> None:
    schema = _schema(TensorSpec("scores", "FP32", [-1, 2]), TensorSpec("label", "INT64", [-1]))
    # 10 rows: scores 80 bytes -> 128 aligned, label 80 -> 128.
    assert estimate_output_bytes(schema, 10, [], 0) == 256
    assert estimate_output_bytes(schema, 10, ["label"], 0) == 128
    assert estimate_output_bytes(schema, 0, [], 0) == 128  # at least one row each
    assert estimate_output_bytes(schema, 10, ["nope"], 0) == 64  # never below one aligned block


def test_estimate_falls_back_for_unknown_sizes() -> None:
    assert estimate_output_bytes(None, 5, [], 10) == UNKNOWN_OUTPUT_BYTES
    assert estimate_output_bytes(None, 5, [], 10 * MiB) == 10 * MiB
    strings = _schema(TensorSpec("tag", "BYTES", [-1]))
    assert estimate_output_bytes(strings, 5, [], 100) == UNKNOWN_OUTPUT_BYTES
    dynamic = _schema(TensorSpec("y", "FP32", [-1, -1]))
    assert estimate_output_bytes(dynamic, 5, [], 200 * 1024) == 200 * 1024
    bf16 = _schema(TensorSpec("y", "BF16", [-1, 4]))
    assert estimate_output_bytes(bf16, 5, [], 0) == UNKNOWN_OUTPUT_BYTES


# ----------------------------------------------------------------------------- worker harness


class FakeWorkerProcess:
    """Engine behind a ROUTER socket: an I/O thread and a compute thread, like workers/process.py."""

    def __init__(self, run_dir: Path, engine: Engine) -> None:
        self.endpoint = endpoints.worker_endpoint(run_dir, 0)
        self.engine = engine
        self.ctx = zmq.Context()
        self.stop_io = threading.Event()
        self.bound = threading.Event()
        self.socket_closed = threading.Event()
        self.jobs: queue.Queue[tuple[bytes, InferRequest] | None] = queue.Queue()
        self.replies: queue.Queue[tuple[bytes, InferReply]] = queue.Queue()
        self.received = 0
        self.io = threading.Thread(target=self._io, name="fake-worker-io", daemon=True)
        self.compute = threading.Thread(target=self._compute, name="fake-worker-compute", daemon=True)

    def start(self) -> None:
        self.io.start()
        self.compute.start()
        assert self.bound.wait(5), "worker socket did not bind"

    def _io(self) -> None:
        sock = endpoints.configure(self.ctx.socket(zmq.ROUTER), linger_ms=0)
        sock.setsockopt(zmq.ROUTING_ID, endpoints.worker_routing_id(0))
        try:
            sock.bind(self.endpoint)
            self.bound.set()
            while not self.stop_io.is_set():
                if sock.poll(5):
                    peer, payload = sock.recv_multipart()
                    self.received += 1
                    self.jobs.put((peer, infer_request_decoder.decode(payload)))
                while True:
                    try:
                        to, reply = self.replies.get_nowait()
                    except queue.Empty:
                        break
                    sock.send_multipart([to, encode(reply)])
        finally:
            sock.close(linger=0)
            self.socket_closed.set()

    def _compute(self) -> None:
        while (job := self.jobs.get()) is not None:
            for to, reply in self.engine.submit(*job):
                self.replies.put((to, reply))

    def close(self) -> None:
        self.stop_io.set()
        self.jobs.put(None)
        self.io.join(timeout=10)
        self.compute.join(timeout=60)  # an inference in progress cannot be interrupted
        assert not self.io.is_alive() and not self.compute.is_alive()
        self.ctx.term()


class Harness:
    def __init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
        self.prefix = f"msrv_unit{os.getpid()}_disp_"
        self.segments = SegmentCache()
        self.engine = Engine(
            SessionCache(), self.segments, SpillWriter(self.prefix), BatchConfig(max_queue_size=1024)
        )
        self.worker = FakeWorkerProcess(self.run_dir, self.engine)
        self.probes = 0  # requests the harness sent to learn that the worker is reachable

    def load(self, model_id: str, path: Path) -> ModelEntry:
        schema = inspect_model(path)
        runner = ModelRunner(path, CPU, schema)
        self.engine.cache.put((model_id, "1"), LoadedModel(runner, schema, BatchConfig(), None), 1)
        return ModelEntry(model_id=model_id, version="1", state="ready", workers=[0], schema=schema)

    def close(self) -> None:
        try:
            self.worker.close()
        finally:
            self.segments.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            sweep(self.prefix, only_dead=False)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dispatch")
    return {
        "linear": models.linear(root / "linear.onnx", features=3, seed=5),
        "slow": models.slow(root / "slow.onnx"),
        "expand": models.expand(root / "expand.onnx"),
    }


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    h.worker.start()
    try:
        yield h
    finally:
        h.close()
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(h.prefix)]


async def _started_dispatcher(h: Harness) -> tuple[zmq.asyncio.Context, Dispatcher]:
    """A started dispatcher that has reached the worker once (a probe for a model it does not hold)."""
    ctx = zmq.asyncio.Context()
    dispatcher = Dispatcher(ctx, h.run_dir, h.prefix, arena_bytes=8 * MiB, workers=1)
    await dispatcher.start()
    probe = ModelEntry(model_id="probe", version="0", state="ready", workers=[0])
    deadline = time.monotonic() + 5
    while True:
        try:
            await dispatcher.infer(probe, [], [], "probe", 5)
        except ApiError as exc:
            if exc.code == "model_not_loaded":  # the worker answered
                break
            assert exc.code == "no_worker", exc.message  # not connected yet
        if time.monotonic() > deadline:
            await _closed(ctx, dispatcher)
            pytest.fail("the dispatcher never reached the worker")
        await asyncio.sleep(0.01)
    h.probes = h.worker.received
    assert dispatcher.arena.allocator.used_bytes == 0
    return ctx, dispatcher


async def _closed(ctx: zmq.asyncio.Context, dispatcher: Dispatcher) -> None:
    await dispatcher.close()
    ctx.term()


# ----------------------------------------------------------------------------- tests


def test_inference_round_trip_matches_onnxruntime(harness: Harness, model_files: dict[str, Path]) -> None:
    entry = harness.load("linear", model_files["linear"])
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)

    async def scenario() -> dict[str, Any]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            arena_name = dispatcher.arena.name
            assert (SHM_DIR / arena_name).exists()
            with await dispatcher.infer(
                entry, [CallInput("x", "FP32", [7, 3], array=x)], [], "t1", 10
            ) as result:
                assert result.worker == 0
                assert result.batch_rows == 7
                got = {o.name: np.array(o.array()) for o in result.outputs}
                assert dispatcher.arena.allocator.used_bytes > 0  # views alive until release
            assert dispatcher.arena.allocator.used_bytes == 0
            # Binary path: raw little-endian bytes instead of an array.
            with await dispatcher.infer(
                entry, [CallInput("x", "FP32", [7, 3], raw=x.tobytes())], ["label"], "t2", 10
            ) as result:
                assert [o.name for o in result.outputs] == ["label"]
                got["label_raw"] = np.array(result.outputs[0].array())
            assert dispatcher.inflight == {}
            assert dispatcher.stats["requests"] == harness.probes + 2
            return got
        finally:
            await _closed(ctx, dispatcher)
            assert not (SHM_DIR / arena_name).exists()

    got = asyncio.run(scenario())
    want = ort_run(model_files["linear"], {"x": x})
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["label_raw"], want["label"])


def test_spilled_outputs_are_read_and_unlinked(harness: Harness, model_files: dict[str, Path]) -> None:
    """Expand's output size depends on an input value: the estimate is short and the worker spills."""
    entry = harness.load("expand", model_files["expand"])
    x = np.arange(4, dtype=np.float32).reshape(4, 1)
    shape = np.array([4, 20_000], dtype=np.int64)  # 320 000 bytes out, estimate 64 KiB
    inputs = [CallInput("x", "FP32", [4, 1], array=x), CallInput("shape", "INT64", [2], array=shape)]
    spill_prefix = f"{harness.prefix}w{os.getpid()}_"

    async def scenario() -> np.ndarray[Any, Any]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            with await dispatcher.infer(entry, inputs, [], "t-spill", 10) as result:
                spills = [n for n in os.listdir(SHM_DIR) if n.startswith(spill_prefix)]
                assert len(spills) == 1
                y = np.array(result.outputs[0].array())
            assert [n for n in os.listdir(SHM_DIR) if n.startswith(spill_prefix)] == []
            assert dispatcher.arena.allocator.used_bytes == 0
            return y
        finally:
            await _closed(ctx, dispatcher)

    y = asyncio.run(scenario())
    np.testing.assert_array_equal(y, ort_run(model_files["expand"], {"x": x, "shape": shape})["y"])


def test_socket_monitor_sees_the_worker_connect(harness: Harness) -> None:
    async def scenario() -> dict[int, bool]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            for _ in range(100):  # a second at most; the handshake is already done
                if dispatcher.connected.get(0):
                    break
                await asyncio.sleep(0.01)
            return dict(dispatcher.connected)
        finally:
            await _closed(ctx, dispatcher)

    assert asyncio.run(scenario()) == {0: True}


def test_worker_gone_mid_request_fails_fast_and_frees_the_slot(
    harness: Harness, model_files: dict[str, Path]
) -> None:
    entry = harness.load("slow", model_files["slow"])
    x = np.ones((192, 1024), dtype=np.float32)  # about a second or more of one CPU thread

    async def scenario() -> tuple[ApiError, float, int]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            task = asyncio.create_task(
                dispatcher.infer(entry, [CallInput("x", "FP32", [192, 1024], array=x)], [], "t-slow", 2.5)
            )
            deadline = time.monotonic() + 10
            while harness.engine.running == 0:  # the worker is inside onnxruntime now
                if time.monotonic() > deadline:
                    pytest.fail("the worker never started the slow inference")
                await asyncio.sleep(0.005)
            assert dispatcher.arena.allocator.used_bytes > 0
            assert len(dispatcher.inflight) == 1
            closed_at = time.monotonic()
            harness.worker.stop_io.set()  # the worker's socket goes away, as when its process dies
            with pytest.raises(ApiError) as info:
                await asyncio.wait_for(task, 10)
            elapsed = time.monotonic() - closed_at
            # Failed by the disconnect, not by a reply: the inference is still running.
            running = harness.engine.running
            assert dispatcher.arena.allocator.used_bytes == 0
            assert dispatcher.arena.allocator.live == 0
            assert dispatcher.inflight == {}
            assert dispatcher.per_worker.get(0, set()) == set()
            assert dispatcher.stats["worker_deaths"] == 1
            assert dispatcher.connected[0] is False
            return info.value, elapsed, running
        finally:
            await _closed(ctx, dispatcher)

    error, elapsed, running = asyncio.run(scenario())
    assert error.status == 503
    assert error.code == "worker_died"
    assert running == 1, "the request failed only after the worker finished it"
    assert elapsed < 1.0


def test_no_worker_holding_the_model_is_503(harness: Harness, model_files: dict[str, Path]) -> None:
    entry = harness.load("linear", model_files["linear"])
    nobody = ModelEntry(model_id="linear", version="1", state="ready", workers=[], schema=entry.schema)
    x = np.zeros((1, 3), dtype=np.float32)

    async def scenario() -> tuple[ApiError, int]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            with pytest.raises(ApiError) as info:
                await dispatcher.infer(nobody, [CallInput("x", "FP32", [1, 3], array=x)], [], "t", 5)
            return info.value, dispatcher.arena.allocator.used_bytes
        finally:
            await _closed(ctx, dispatcher)

    error, used = asyncio.run(scenario())
    assert (error.status, error.code, error.retry_after) == (503, "no_worker", 1)
    assert used == 0
    assert harness.worker.received == harness.probes  # nothing sent


def test_worker_known_gone_is_503_at_once(harness: Harness, model_files: dict[str, Path]) -> None:
    entry = harness.load("linear", model_files["linear"])
    x = np.zeros((1, 3), dtype=np.float32)

    async def scenario() -> tuple[ApiError, float, int]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            harness.worker.stop_io.set()
            assert harness.worker.socket_closed.wait(5)
            await asyncio.sleep(0.2)  # the disconnection reaches the dispatcher's socket
            started = time.monotonic()
            with pytest.raises(ApiError) as info:
                await dispatcher.infer(entry, [CallInput("x", "FP32", [1, 3], array=x)], [], "t", 1.0)
            return info.value, time.monotonic() - started, dispatcher.arena.allocator.used_bytes
        finally:
            await _closed(ctx, dispatcher)

    error, elapsed, used = asyncio.run(scenario())
    assert (error.status, error.code) == (503, "no_worker")
    assert elapsed < 0.5
    assert used == 0


def test_too_large_for_the_arena_is_413(harness: Harness, model_files: dict[str, Path]) -> None:
    entry = harness.load("linear", model_files["linear"])
    big = np.zeros((1_000_000, 3), dtype=np.float32)  # 12 MB in an 8 MiB arena

    async def scenario() -> ApiError:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            with pytest.raises(ApiError) as info:
                await dispatcher.infer(entry, [CallInput("x", "FP32", [1_000_000, 3], array=big)], [], "t", 5)
            assert dispatcher.arena.allocator.used_bytes == 0
            return info.value
        finally:
            await _closed(ctx, dispatcher)

    error = asyncio.run(scenario())
    assert (error.status, error.code) == (413, "payload_too_large")
    assert "MODEL_SERVER_SHM_ARENA_BYTES" in error.message


def test_worker_errors_map_to_http_statuses(harness: Harness, model_files: dict[str, Path]) -> None:
    entry = harness.load("linear", model_files["linear"])
    x = np.zeros((2, 3), dtype=np.float32)

    async def scenario() -> list[ApiError]:
        ctx, dispatcher = await _started_dispatcher(harness)
        errors = []
        try:
            # Wrong trailing dimension: onnxruntime refuses it (422).
            bad = np.zeros((2, 4), dtype=np.float32)
            with pytest.raises(ApiError) as info:
                await dispatcher.infer(entry, [CallInput("x", "FP32", [2, 4], array=bad)], [], "t", 5)
            errors.append(info.value)
            # The worker holds no session for this version (503, retry).
            other = ModelEntry(
                model_id="linear", version="2", state="ready", workers=[0], schema=entry.schema
            )
            with pytest.raises(ApiError) as info:
                await dispatcher.infer(other, [CallInput("x", "FP32", [2, 3], array=x)], [], "t", 5)
            errors.append(info.value)
            assert dispatcher.arena.allocator.used_bytes == 0
            return errors
        finally:
            await _closed(ctx, dispatcher)

    bad_input, not_loaded = asyncio.run(scenario())
    assert (bad_input.status, bad_input.code) == (422, "invalid_input")
    assert (not_loaded.status, not_loaded.code) == (503, "model_not_loaded")
    assert not_loaded.retry_after == 1
