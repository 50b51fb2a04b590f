from __future__ import annotations

import os
from pathlib import Path

from bench.interference import CpuAccount
from bench.memory import sample
from bench.report import fmt_busy, fmt_num, fmt_ratio
from bench.stats import Cell
from bench.venv import STAMP, is_current, requirements_hash


def test_venv_stamp(tmp_path: Path) -> None:
    reqs = tmp_path / "req.txt"
    reqs.write_text("mlserver==1.7.1\n")
    venv = tmp_path / "venv"
    assert not is_current(venv, reqs)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "mlserver").write_text("")
    (venv / STAMP).write_text(requirements_hash(reqs) + "\n")
    assert is_current(venv, reqs)
    reqs.write_text("mlserver==1.7.0\n")
    assert not is_current(venv, reqs)  # a changed pin list rebuilds


def test_formatting() -> None:
    assert fmt_num(126000.4) == "126,000" and fmt_num(85.04) == "85.0" and fmt_num(0.4321) == "0.432"
    assert fmt_ratio(None) == "—" and fmt_ratio(2.345) == "2.35x" and fmt_ratio(0.0123) == "0.012x"
    assert fmt_ratio(12.4) == "12x"
    cell = Cell("ours", "cnn", "v2-json", 1, busy_elsewhere_pct=42.0)
    assert fmt_busy(cell) == "**42%**"


def test_own_process_accounting() -> None:
    rss, _, count = sample([os.getpid()], with_pss=False)
    assert rss > 0 and count >= 1
    assert CpuAccount(lambda: []).foreign_pct() >= 0.0
