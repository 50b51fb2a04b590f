"""Shared pytest configuration for every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# prometheus-client writes `<kind>_<pid>.db` files into PROMETHEUS_MULTIPROC_DIR from any
# process that has it set (a relative path resolves against the working directory), and it
# decides so when first imported. Inherited from a shell, it would make in-process tests write
# wherever it points: this process keeps its own registry instead. Processes under test get a
# directory of their own under their run dir from `model-server serve`.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.pop("prometheus_multiproc_dir", None)  # the deprecated spelling prometheus-client still reads


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_repository() -> Iterator[None]:
    """No test leaves metric files (or any other .db) at the repository root."""
    before = set(ROOT.glob("*.db"))
    yield
    new = sorted(p.name for p in set(ROOT.glob("*.db")) - before)
    assert not new, f"the test run wrote {new} into {ROOT}"


# --- real services (moto S3, MLflow tracking server): see tests/services.py ---------------
pytest_plugins = ["tests.services"]
