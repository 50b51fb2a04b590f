from __future__ import annotations

from typing import Any

import pytest

from bench.report import (
    MD_END,
    MD_START,
    at_least,
    at_most,
    evaluate_targets,
    index,
    render_markdown,
    replace_section,
    vs_best_peer,
    vs_ort,
)
from bench.stats import SKIPPED, Cell, Rep


def cell(peer: str, model: str, path: str, c: int, rps: float, p50: float = 1.0, **kw: Any) -> Cell:
    out = Cell(peer, model, path, c, **kw)
    out.reps = [Rep(int(rps * 10), 10.0, p50, p50 * 3)]
    return out


def sample_cells() -> list[Cell]:
    return [
        cell("ours", "tabular", "v2-json", 32, 4000, frontend_cpu_us=280.0, mean_batch_rows=1.0),
        cell("ours", "tabular", "v2-binary", 32, 5000),
        cell("ours", "tabular", "v2-json", 1, 2000, p50=0.4),
        cell("mlserver", "tabular", "v2-json", 1, 1500, p50=0.5),
        cell("pytriton", "tabular", "v2-json", 1, 500, p50=1.9),
        cell("mlserver", "tabular", "v2-json", 32, 2100),
        cell("mlserver-parallel", "tabular", "v2-json", 32, 800),
        cell("pytriton", "tabular", "v2-json", 32, 2800),
        cell("litserve", "tabular", "v2-json", 32, 1200),
        cell("pytriton", "tabular", "v2-binary", 32, 2600),
        cell("ort", "tabular", "in-process", 1, 100000),
        cell("ours", "cnn", "v2-json", 8, 100),
        cell("mlserver", "cnn", "v2-json", 8, 85),
        cell("ort", "cnn", "in-process", 1, 2300),
        cell("ours", "mlp", "v2-binary", 32, 130, mean_batch_rows=1.0),
        cell("ours", "mlp", "v2-binary", 32, 700, batching=True, mean_batch_rows=9.5),
        cell("pytriton", "mlp", "v2-binary", 32, 530, batching=True, mean_batch_rows=22.3),
    ]


def test_ratios() -> None:
    idx = index(sample_cells())
    ours = idx[("ours", "tabular", "v2-json", 32, 1, False)]
    assert vs_best_peer(idx, ours) == pytest.approx(4000 / 2800)  # PyTriton is the best peer on JSON
    binary = idx[("ours", "tabular", "v2-binary", 32, 1, False)]
    assert vs_best_peer(idx, binary) == pytest.approx(5000 / 2600)  # same path only
    batched = idx[("ours", "mlp", "v2-binary", 32, 1, True)]
    assert vs_best_peer(idx, batched) == pytest.approx(700 / 530)  # against Triton's batcher
    assert vs_best_peer(idx, idx[("pytriton", "tabular", "v2-json", 32, 1, False)]) is None
    assert vs_best_peer(idx, idx[("ours", "cnn", "v2-json", 8, 1, False)]) == pytest.approx(100 / 85)
    assert vs_ort(idx, ours) == pytest.approx(0.04)


def test_verdict_arithmetic() -> None:
    assert at_least("t", 150, 100, "x").status == "met"
    assert at_least("t", 75, 100, "x").status == "missed by 25%"
    assert at_least("t", None, 100, "x").status == "not measured"
    assert at_most("t", 0.4, 0.5, "ms").status == "met"
    assert at_most("t", 0.75, 0.5, "ms").status == "missed by 50%"


def test_targets() -> None:
    verdicts = evaluate_targets(sample_cells())
    statuses = [v.status for v in verdicts]
    # tabular: p50 0.4 below MLServer's 0.5 (the best peer); 4000 < 1.5 x 2800; CPU 280 <= 300 µs
    assert statuses[0] == "met" and "mlserver" in verdicts[0].target
    assert statuses[1] == "missed by 5%" and "pytriton" in verdicts[1].target
    assert statuses[2] == "met"
    # MLP: 700 >= 5 x 130; mean batch 9.5 < 12 (missed by 21%); 700 < 1.5 x 530 (missed by 12%)
    assert statuses[3:6] == ["met", "missed by 21%", "missed by 12%"]
    # CNN: 100 < 2 x 85
    assert statuses[6] == "missed by 41%"
    assert statuses[7] == "not measured" and "gRPC" in verdicts[7].target  # issue 11: no gRPC cell
    with_grpc = evaluate_targets([*sample_cells(), cell("ours", "tabular", "grpc", 32, 4500)])
    assert with_grpc[7].status == "missed by 10%"  # 4500 req/s against REST binary's 5000


def test_targets_not_measured_without_cells() -> None:
    assert {v.status for v in evaluate_targets([])} == {"not measured"}


def test_equal_p50_is_not_below() -> None:
    cells = [
        cell("ours", "tabular", "v2-json", 1, 10, p50=0.5),
        cell("litserve", "tabular", "v2-json", 1, 10, p50=0.5),
    ]
    assert evaluate_targets(cells)[0].status.startswith("missed")


def test_replace_section() -> None:
    section = f"{MD_START}\nnew\n{MD_END}\n"
    doc = f"# Benchmarks\n\nintro\n\n{MD_START}\nold\n{MD_END}\n\ntail\n"
    out = replace_section(doc, section)
    assert "old" not in out and "new" in out and out.endswith("\n\ntail\n") and out.startswith("# Benchmarks")
    assert replace_section("# B\n", section) == "# B\n\n" + section
    assert replace_section(out, section) == out  # idempotent


def test_render_markdown_smoke() -> None:
    results = {
        "meta": {
            "date": "2025-01-01T00:00:00+00:00",
            "machine": {"cpu": "AMD EPYC", "cores": 2, "ram_gib": 24, "os": "Linux"},
            "versions": {"mlserver": "1.7.1"},
            "settings": {"duration_s": 10, "reps": 3, "workers": 2, "concurrency": [1, 32], "quick": False},
        },
        "peers": {
            "ours": {"label": "this server", "available": False, "note": "exited with code 1\nlog"},
            "mlserver": {"label": "MLServer", "memory": {"rss_bytes": 300 * 2**20, "processes": 1}},
        },
        "cells": [c.to_json() for c in sample_cells()]
        + [Cell("ours", "tabular", "grpc", 32, error=SKIPPED + "no gRPC frontend").to_json()]
        + [cell("ours", "tabular", "py-grpc", 32, 900).to_json()],
    }
    text = render_markdown(results)
    assert text.startswith(MD_START) and text.rstrip().endswith(MD_END)
    assert "`ours` not available: exited with code 1" in text
    assert "| v2-json (wrk) | 32 | ours | 4,000 | 4,000 | 1.00 | 3.00 | 0 | 1.00 | 280 | 1.43x |" in text
    assert (
        "| v2-binary (wrk) +batching | 32 | pytriton | 530 | 530 | 1.00 | 3.00 | 0 | 22.3 | — | — |" in text
    )
    assert "| grpc (h2load) | 32 | ours | skipped: no gRPC frontend |" in text
    assert "| py-grpc (tritonclient.grpc) | 32 | ours | 900 |" in text
    assert "- grpc rows (h2load):" in text and "- py-grpc rows" in text
    assert "300 MiB" in text
    assert "### Targets" in text
