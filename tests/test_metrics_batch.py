"""Request metrics counted in memory and written in batches stay exact.

``metrics.RequestMetrics`` replaces eight multiprocess-file writes per request with
sums per label set, written on a timer, on a read and at shutdown. The same
seeded observations are written by two "frontend" processes through it, and by
two more straight through prometheus-client's own ``inc``/``observe`` (the
previous path) into another directory: the summed samples must be identical.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipc.arena import pid_alive
from model_server import metrics
from tests.metrics_process import run_with_metrics_dir

# Durations on bucket bounds (le is inclusive), between them, past the last bound, and zero.
OBSERVE = """
import asyncio, json, random, sys
from model_server import metrics

mode, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
bounds = list(metrics.LATENCY_BUCKETS)
keys = [("m", "1", "v2", 200), ("m", "1", "v1", 422), ("m", "1", "v2", 503), ("unknown", "", "v1", 404)]

def value() -> float:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(bounds)
    if pick < 0.4:
        return rng.choice([0.0, 31.0, 100.0])
    return rng.uniform(0, 3)

events = []
for _ in range(400):
    key = keys[rng.randrange(len(keys))]
    ran = key[3] == 200 or rng.random() < 0.5
    events.append((key, value(), value() if ran else None, value() if ran else None))

def direct(key, duration, queue, compute):
    model, version, protocol, status = key
    metrics.REQUESTS.labels(model, version, protocol, str(status)).inc()
    outcome = "success" if status == 200 else "fail"
    metrics.REQUEST_DURATION.labels(model, version, protocol, outcome).observe(duration)
    if queue is not None:
        metrics.QUEUE_DURATION.labels(model, version).observe(queue)
        metrics.COMPUTE_DURATION.labels(model, version).observe(compute)
        metrics.LAST_INFERENCE.labels(model, version).set(1.0)

async def batched() -> None:
    recorder = metrics.RequestMetrics(flush_interval_s=0.02)
    for index, (key, duration, queue, compute) in enumerate(events):
        recorder.record(key, duration, queue, compute)
        if index % 97 == 0:
            await asyncio.sleep(0.05)  # let the flush timer write part of it
    recorder.close()

if mode == "direct":
    for event in events:
        direct(*event)
else:
    asyncio.run(batched())
"""

READ = """
import json
from model_server import metrics
out = []
for family in metrics.process_registry().collect():
    for s in family.samples:
        if s.name.startswith("model_server_last_inference"):
            continue  # a timestamp: compared apart
        out.append([s.name, sorted(s.labels.items()), s.value])
print(json.dumps(sorted(out)))
"""


def test_batched_writes_sum_to_the_same_samples_as_direct_writes(tmp_path: Path) -> None:
    batched, direct = tmp_path / "batched", tmp_path / "direct"
    batched.mkdir()
    direct.mkdir()
    for seed in ("1", "2"):  # two frontends each
        run_with_metrics_dir(OBSERVE, tmp_path, batched, "batched", seed)
        run_with_metrics_dir(OBSERVE, tmp_path, direct, "direct", seed)
    got = json.loads(run_with_metrics_dir(READ, tmp_path, batched))
    want = json.loads(run_with_metrics_dir(READ, tmp_path, direct))
    requests = [s for s in want if s[0] == "model_server_requests_total"]
    assert sum(s[2] for s in requests) == 800
    assert [s[:2] for s in got] == [s[:2] for s in want]
    for (name, labels, value), expected in zip(got, want, strict=True):
        # Sums of the same numbers in another order differ only in the last bits.
        assert abs(value - expected[2]) <= 1e-9 * max(1.0, abs(expected[2])), (name, labels)


def test_pending_counts_are_written_before_this_process_reads_them() -> None:
    key = ("batch-test", "1", "v2", 200)
    child = metrics.REQUESTS.labels("batch-test", "1", "v2", "200")

    async def run() -> tuple[float, float, float]:
        recorder = metrics.RequestMetrics(flush_interval_s=60)  # the timer never fires here
        before = child._value.get()
        for _ in range(5):
            recorder.record(key, 0.001, 0.0002, 0.0003)
        pending = child._value.get()
        metrics.process_registry()  # what /metrics and the statistics extension call first
        after = child._value.get()
        recorder.close()
        return before, pending, after

    before, pending, after = asyncio.run(run())
    assert pending == before  # nothing written per request
    assert after == before + 5


def test_interval_zero_writes_each_request_at_once() -> None:
    child = metrics.REQUESTS.labels("batch-test", "1", "v1", "200")

    async def run() -> tuple[float, float]:
        recorder = metrics.RequestMetrics(flush_interval_s=0)
        before = child._value.get()
        recorder.record(("batch-test", "1", "v1", 200), 0.002)
        return before, child._value.get()

    before, after = asyncio.run(run())
    assert after == before + 1


def test_a_reader_skips_dead_writers_and_gives_up_on_a_wedged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    dead = tmp_path / f"pending_{int(gone.stdout)}_0.bin"
    dead.write_bytes(struct.pack("d", 1.0))  # counted long ago, never written: it died
    assert metrics.await_other_writers(5.0, pid_alive)
    assert not dead.exists()
    # A live process (this one's parent) whose mark predates the read and is never cleared.
    wedged = tmp_path / f"pending_{os.getppid()}_0.bin"
    wedged.write_bytes(struct.pack("d", 1.0))
    assert not metrics.await_other_writers(0.05, pid_alive)
    # One whose batch began after the read started is not waited for.
    wedged.write_bytes(struct.pack("d", time.monotonic() + 3600))
    assert metrics.await_other_writers(5.0, pid_alive)
