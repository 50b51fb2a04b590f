"""Request deadlines in the dispatcher: one timer for all of them, re-armed for the earliest.

The worker is the real Engine behind a real ROUTER (the harness of test_dispatcher.py),
with a gate in front of its compute thread so that the test decides when it answers:
while the gate is shut, only the dispatcher's own deadline can end a request.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from frontend.dispatcher import CallInput
from frontend.errors import ApiError
from tests import models
from tests.models import ort_run
from workers.serving import Engine

from .test_dispatcher import FakeWorkerProcess, Harness, _closed, _started_dispatcher


class GatedWorker(FakeWorkerProcess):
    """Takes requests off the socket at once but computes only while ``gate`` is open."""

    def __init__(self, run_dir: Path, engine: Engine) -> None:
        super().__init__(run_dir, engine)
        self.gate = threading.Event()
        self.gate.set()

    def _compute(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.gate.wait(60)
            for to, reply in self.engine.submit(*job):
                self.replies.put((to, reply))

    def close(self) -> None:
        self.gate.set()
        super().close()


def test_a_shorter_deadline_fires_first_and_its_slot_waits_for_the_late_reply(
    gated: tuple[Harness, GatedWorker], tmp_path: Path
) -> None:
    harness, worker = gated
    path = models.linear(tmp_path / "linear.onnx", features=3, seed=11)
    entry = harness.load("linear", path)
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)

    async def scenario() -> tuple[str, bool, dict[str, np.ndarray]]:
        ctx, dispatcher = await _started_dispatcher(harness)
        try:
            worker.gate.clear()
            long = asyncio.ensure_future(
                dispatcher.infer(entry, [CallInput("x", "FP32", [5, 3], array=x)], [], "long", 60)
            )
            await asyncio.sleep(0)  # sent first: the deadline timer is armed for 60 s
            with pytest.raises(ApiError) as short:
                await dispatcher.infer(entry, [CallInput("x", "FP32", [5, 3], array=x)], [], "short", 0.05)
            assert short.value.status == 504
            long_pending = not long.done()
            # The short request's slot is quarantined: the worker still holds it.
            assert dispatcher.stats["quarantined"] == 1
            worker.gate.set()
            with await long as result:
                got = {o.name: np.array(o.array()) for o in result.outputs}
            for _ in range(3000):  # bounded: the late reply for the short request frees its slot
                if not dispatcher.stats["quarantined"]:
                    break
                await asyncio.sleep(0.01)
            assert dispatcher.stats["quarantined"] == 0
            assert dispatcher.arena.allocator.used_bytes == 0
            return short.value.message, long_pending, got
        finally:
            await _closed(ctx, dispatcher)

    message, long_pending, got = asyncio.run(scenario())
    # The frontend's own deadline ended it (the worker's refusal says "deadline passed ..."),
    # while the request sent before it with a later deadline was still waiting.
    assert message.startswith("no answer within 0.05 s")
    assert long_pending
    want = ort_run(path, {"x": x})
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["label"], want["label"])
