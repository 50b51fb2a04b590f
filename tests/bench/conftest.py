"""Tests of the benchmark harness's own logic: offline, fast, no servers started."""

from __future__ import annotations

import sys
from pathlib import Path

# `bench` is not an installed package: make the repository root importable however
# pytest is launched (`python -m pytest` adds it already, the `pytest` script does not).
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
