"""Fixtures shared by the dispatcher tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .test_dispatcher import Harness
from .test_dispatcher_deadlines import GatedWorker


@pytest.fixture
def gated() -> Iterator[tuple[Harness, GatedWorker]]:
    h = Harness()
    worker = GatedWorker(h.run_dir, h.engine)
    h.worker = worker
    worker.start()
    try:
        yield h, worker
    finally:
        h.close()
