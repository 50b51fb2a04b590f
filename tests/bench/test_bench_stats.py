from __future__ import annotations

import pytest

from bench.stats import Cell, Rep, percentile, rep_from_latencies


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # nan


def test_rep_from_latencies() -> None:
    rep = rep_from_latencies([0.001] * 98 + [0.010, 0.020], duration_s=2.0, errors=1)
    assert rep.requests == 100
    assert rep.rps == pytest.approx(50.0)
    assert rep.p50_ms == pytest.approx(1.0)
    assert rep.p99_ms == pytest.approx(10.0)
    assert rep.max_ms == pytest.approx(20.0)
    assert rep.errors == 1


def test_cell_medians_and_rows() -> None:
    cell = Cell("ours", "mlp", "v2-json", 64, batch=4)
    cell.reps = [
        Rep(100, 1.0, 1.0, 9.0, errors=1),
        Rep(300, 1.0, 3.0, 5.0),
        Rep(200, 1.0, 2.0, 7.0, errors=2),
    ]
    assert cell.ok
    assert cell.rps == 200.0
    assert cell.rows_per_s == 800.0
    assert cell.p50_ms == 2.0
    assert cell.p99_ms == 7.0
    assert cell.errors == 3


def test_cell_json_round_trip() -> None:
    cell = Cell("ours", "cnn", "py-shm", 8, batching=True, served_as="cnn", client="py")
    cell.reps = [Rep(10, 2.0, 1.5, 3.0, error_detail={"read": 1})]
    data = cell.to_json()
    assert data["median"]["rps"] == 5.0
    back = Cell.from_json(data)
    assert back.key == cell.key
    assert back.reps[0].error_detail == {"read": 1}
    failed = Cell("mlserver", "cnn", "v2-json", 1, error="peer not available")
    assert not failed.ok and "median" not in failed.to_json()
