"""Sends made together at the end of a loop iteration: every request of a burst goes out and
comes back to its own caller, and a caller that leaves around the send frees or quarantines its slot.

Real worker Engine behind a real ROUTER (the harness of test_dispatcher.py), gated so the
test decides when it computes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from frontend.dispatcher import CallInput, Dispatcher
from tests import models
from tests.models import ort_run

from .test_dispatcher import Harness, _closed, _started_dispatcher
from .test_dispatcher_deadlines import GatedWorker


def test_a_burst_goes_out_together_and_each_caller_gets_its_own_rows(
    gated: tuple[Harness, GatedWorker], tmp_path: Path
) -> None:
    harness, _ = gated
    path = models.linear(tmp_path / "linear.onnx", features=3, seed=4)
    entry = harness.load("linear", path)
    rng = np.random.default_rng(8)
    xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 2, 3, 4, 5, 6, 7, 8)]

    async def one(dispatcher: Dispatcher, x: np.ndarray, i: int) -> np.ndarray:
        with await dispatcher.infer(
            entry, [CallInput("x", "FP32", list(x.shape), array=x)], ["scores"], f"b{i}", 30
        ) as result:
            return np.array(result.outputs[0].array())

    async def scenario() -> list[np.ndarray]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            sent_before = dispatcher.stats["requests"]
            got = await asyncio.gather(*(one(dispatcher, x, i) for i, x in enumerate(xs)))
            assert dispatcher.stats["requests"] == sent_before + len(xs)
            assert dispatcher.inflight == {} and dispatcher.arena.allocator.used_bytes == 0
            return list(got)
        finally:
            await _closed(ctx, dispatcher)

    for x, got in zip(xs, asyncio.run(scenario()), strict=True):
        np.testing.assert_allclose(got, ort_run(path, {"x": x})["scores"], rtol=1e-6, atol=1e-7)


def test_leaving_before_the_send_frees_the_slot_and_after_it_quarantines(
    gated: tuple[Harness, GatedWorker], tmp_path: Path
) -> None:
    harness, worker = gated
    path = models.linear(tmp_path / "linear.onnx", features=3, seed=6)
    entry = harness.load("linear", path)
    x = np.ones((2, 3), dtype=np.float32)

    async def scenario() -> None:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            received = worker.received
            # Cancelled in the same iteration it was queued: never sent, slot freed at once.
            early = asyncio.ensure_future(
                dispatcher.infer(entry, [CallInput("x", "FP32", [2, 3], array=x)], [], "e", 30)
            )
            await asyncio.sleep(0)  # it runs up to the queued send
            early.cancel()
            with pytest.raises(asyncio.CancelledError):
                await early
            assert dispatcher.arena.allocator.used_bytes == 0 and dispatcher.inflight == {}
            # Cancelled once sent (the worker is gated): the slot waits for the worker's reply.
            worker.gate.clear()
            late = asyncio.ensure_future(
                dispatcher.infer(entry, [CallInput("x", "FP32", [2, 3], array=x)], [], "l", 30)
            )
            for _ in range(1000):  # bounded: until the request is in flight
                await asyncio.sleep(0.001)
                if dispatcher.inflight:
                    break
            late.cancel()
            with pytest.raises(asyncio.CancelledError):
                await late
            assert dispatcher.stats["quarantined"] == 1 and dispatcher.arena.allocator.used_bytes > 0
            worker.gate.set()
            for _ in range(3000):  # bounded: the late reply frees it
                if not dispatcher.stats["quarantined"]:
                    break
                await asyncio.sleep(0.01)
            assert dispatcher.stats["quarantined"] == 0 and dispatcher.arena.allocator.used_bytes == 0
            assert worker.received == received + 1  # only the second one was ever sent
        finally:
            await _closed(ctx, dispatcher)

    asyncio.run(scenario())
