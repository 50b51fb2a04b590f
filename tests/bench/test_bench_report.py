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
    vs_mlserver,
    vs_ort,
)
from bench.stats import Cell, Rep


def cell(peer: str, model: str, path: str, c: int, rps: float, p50: float = 1.0, **kw: Any) -> Cell:
    out = Cell(peer, model, path, c, **kw)
    out.reps = [Rep(int(rps * 10), 10.0, p50, p50 * 3)]
    return out


def sample_cells() -> list[Cell]:
    return [
        cell("ours", "tabular", "v2-json", 32, 4000),
        cell("ours", "tabular", "v2-binary", 32, 5000),
        cell("ours", "tabular", "v2-json", 1, 2000, p50=0.4),
        cell("mlserver", "tabular", "v2-json", 32, 2100),
        cell("mlserver-parallel", "tabular", "v2-json", 32, 800),
        cell("ort", "tabular", "in-process", 1, 100000),
        cell("ours", "cnn", "v2-json", 32, 100),
        cell("ours", "cnn", "v2-binary", 32, 900),
        cell("ours", "cnn", "py-shm", 1, 500),
        cell("ours", "cnn", "py-shm", 8, 1300),
        cell("mlserver", "cnn", "v2-json", 32, 85),
        cell("mlserver-parallel", "cnn", "v2-json", 32, 60),
        cell("ort", "cnn", "in-process", 1, 2300),
        cell("ours", "mlp", "v2-json", 64, 1000),
        cell("ours", "mlp", "v2-json", 64, 6000, batching=True),
    ]


def test_ratios() -> None:
    idx = index(sample_cells())
    ours = idx[("ours", "tabular", "v2-json", 32, 1, False)]
    assert vs_mlserver(idx, ours, "mlserver") == pytest.approx(4000 / 2100)
    assert vs_mlserver(idx, ours, "mlserver-parallel") == pytest.approx(5.0)
    assert vs_ort(idx, ours) == pytest.approx(0.04)
    binary = idx[("ours", "tabular", "v2-binary", 32, 1, False)]
    assert vs_mlserver(idx, binary, "mlserver-parallel") == pytest.approx(6.25)  # over MLServer's JSON
    assert vs_mlserver(idx, idx[("mlserver", "tabular", "v2-json", 32, 1, False)], "mlserver") is None
    assert vs_mlserver(idx, idx[("ours", "tabular", "v2-json", 1, 1, False)], "mlserver") is None


def test_verdict_arithmetic() -> None:
    assert at_least("t", 150, 100, "x").status == "met"
    assert at_least("t", 75, 100, "x").status == "missed by 25%"
    assert at_least("t", None, 100, "x").status == "not measured"
    assert at_most("t", 0.4, 0.5, "ms").status == "met"
    assert at_most("t", 0.75, 0.5, "ms").status == "missed by 50%"


def test_targets() -> None:
    statuses = [v.status for v in evaluate_targets(sample_cells())]
    # tabular: 4000 >= 2 x 800; 4000 > 2100; p50 0.4 <= 0.5
    assert statuses[0:3] == ["met", "met", "met"]
    # CNN JSON 100 < 2 x 85 (missed by 41%); binary 900 >= 10 x max(85, 60); shm best 1300 >= 1150
    assert statuses[3] == "missed by 41%"
    assert statuses[4] == "met"
    # shared memory: no wrk-driven (v2-shm) cell in the sample; the Python client's one meets it
    assert statuses[5] == "not measured"
    assert statuses[6] == "met"
    # MLP: 6000 >= 5 x 1000 on JSON; binary not measured
    assert statuses[7:] == ["met", "not measured"]


def test_cnn_binary_uses_better_mlserver_mode() -> None:
    verdicts = evaluate_targets(sample_cells())
    assert "850" in verdicts[4].measured  # 10 x max(85, 60)


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
        "cells": [c.to_json() for c in sample_cells()],
    }
    text = render_markdown(results)
    assert text.startswith(MD_START) and text.rstrip().endswith(MD_END)
    assert "`ours` not available: exited with code 1" in text
    assert "| v2-json (wrk) | 32 | ours | 4,000 |" in text
    assert "1.90x" in text and "5.00x" in text  # ÷ MLServer, ÷ MLServer ∥2
    assert "300 MiB" in text
    assert "### Targets" in text
