from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.interference import CpuAccount
from bench.memory import sample
from bench.report import fmt_busy, fmt_num, fmt_ratio
from bench.stats import Cell
from bench.venv import (
    LITSERVE,
    MLSERVER,
    PYTRITON,
    STAMP,
    VenvUnavailable,
    is_current,
    requirements_hash,
    system_python311,
)


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


def test_peer_venvs(tmp_path: Path) -> None:
    fake = tmp_path / "python3.11"
    fake.write_text("")
    assert system_python311((str(tmp_path / "missing"), str(fake))) == str(fake)
    with pytest.raises(VenvUnavailable, match=r"libpython3\.11"):
        system_python311((str(tmp_path / "missing"),))
    # PyTriton's backend stub loads the system libpython3.11: only its venv comes from that python.
    assert PYTRITON.system_python and not LITSERVE.system_python and not MLSERVER.system_python
    reqs = tmp_path / "req.txt"
    reqs.write_text("litserve==0.2.19\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / STAMP).write_text(requirements_hash(reqs) + "\n")
    assert not is_current(venv, reqs, "python")  # the marker file is missing
    (venv / "bin" / "python").write_text("")
    assert is_current(venv, reqs, "python") and not is_current(venv, reqs, "mlserver")
