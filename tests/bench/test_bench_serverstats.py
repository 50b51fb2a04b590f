"""Mean executed batch and frontend CPU per request: parsing and arithmetic (no servers)."""

from __future__ import annotations

import os

import pytest

from bench.serverstats import (
    BatchCounters,
    cpu_seconds,
    cpu_us_per_request,
    mean_batch,
    ours_batch_counters,
    parse_prometheus,
    triton_batch_counters,
)

# What this server's /metrics shows in multiprocess mode: one series per worker.
OURS_METRICS = """\
# HELP model_server_batch_size_rows Rows per ONNX Runtime call, as executed, by worker.
# TYPE model_server_batch_size_rows histogram
model_server_batch_size_rows_bucket{le="1.0",model="mlp_batched",version="1",worker="0"} 3.0
model_server_batch_size_rows_sum{model="mlp_batched",version="1",worker="0"} 120.0
model_server_batch_size_rows_count{model="mlp_batched",version="1",worker="0"} 10.0
model_server_batch_size_rows_sum{model="mlp_batched",version="1",worker="1"} 80.0
model_server_batch_size_rows_count{model="mlp_batched",version="1",worker="1"} 10.0
model_server_batch_size_rows_sum{model="mlp",version="1",worker="0"} 7.0
model_server_batch_size_rows_count{model="mlp",version="1",worker="0"} 7.0
model_server_requests_total{model="mlp_batched",version="1",status="200"} 200.0
"""

TRITON_METRICS = """\
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="mlp_batched",version="1"} 640
nv_inference_count{model="mlp",version="1"} 12
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="mlp_batched",version="1"} 40
nv_inference_exec_count{model="mlp",version="1"} 12
"""


def test_parse_prometheus_keeps_labels_and_skips_junk() -> None:
    samples = parse_prometheus(OURS_METRICS + 'garbage line\nmetric_without_value\nbad{a="1"} x\n')
    series = samples["model_server_batch_size_rows_sum"]
    assert (("model", "mlp_batched"), ("version", "1"), ("worker", "1")) in [labels for labels, _ in series]
    assert "garbage" not in samples and "bad" not in samples
    assert parse_prometheus('up 1\nescaped{path="a\\"b"} 2') == {
        "up": [((), 1.0)],
        "escaped": [((("path", 'a\\"b'),), 2.0)],
    }


def test_ours_batch_counters_sum_workers_of_one_model() -> None:
    assert ours_batch_counters(OURS_METRICS, "mlp_batched") == BatchCounters(rows=200.0, executions=20.0)
    assert ours_batch_counters(OURS_METRICS, "mlp") == BatchCounters(rows=7.0, executions=7.0)
    assert ours_batch_counters(OURS_METRICS, "cnn") == BatchCounters(rows=0.0, executions=0.0)


def test_triton_batch_counters() -> None:
    assert triton_batch_counters(TRITON_METRICS, "mlp_batched") == BatchCounters(rows=640.0, executions=40.0)


def test_mean_batch_is_a_delta() -> None:
    before = BatchCounters(rows=200.0, executions=20.0)
    after = BatchCounters(rows=200.0 + 16 * 30, executions=50.0)
    assert mean_batch(before, after) == pytest.approx(16.0)
    assert mean_batch(before, before) is None  # nothing executed in the cell
    assert mean_batch(None, after) is None and mean_batch(before, None) is None


def test_cpu_per_request() -> None:
    before = {1: 10.0, 2: 20.0, 3: 5.0}
    after = {1: 10.5, 2: 20.25, 4: 99.0}  # 3 died, 4 appeared: neither counts
    assert cpu_us_per_request(before, after, 2500) == pytest.approx(300.0)
    assert cpu_us_per_request(before, after, 0) is None
    assert cpu_us_per_request({}, after, 10) is None


def test_cpu_seconds_of_live_processes() -> None:
    busy = sum(i * i for i in range(200_000))  # some CPU time of our own
    assert busy > 0
    seen = cpu_seconds([os.getpid(), 2**22 + 12345])  # the second pid does not exist
    assert list(seen) == [os.getpid()] and seen[os.getpid()] > 0.0
