"""Tests of the benchmark harness's own logic: offline, fast, no servers started."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

# `bench` is not an installed package: make the repository root importable however
# pytest is launched (`python -m pytest` adds it already, the `pytest` script does not).
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


from bench.peers import Peer  # noqa: E402 - importable once ROOT is on the path

P = TypeVar("P", bound=Peer)


def running(peer: P) -> Iterator[P]:
    """A peer started for a fixture to yield; stopped, with nothing left, after."""
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()
    assert peer.proc is None
