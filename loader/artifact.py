"""What a source hands back: a verified local ONNX file and what is known about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Progress:
    """Download progress of one artifact; ``total`` is 0 when the size is unknown."""

    done: int
    total: int
    rate_bps: float

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0


ProgressCallback = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class Artifact:
    """A local ``model.onnx`` that passed verification (never a partial download)."""

    path: Path
    sha256: str
    size: int
    source_uri: str  # normalised URI it came from
    # Record schema from an MLflow signature: column names in order, and their OIP datatypes.
    feature_names: list[str] | None = None
    feature_types: dict[str, str] = field(default_factory=dict)
    downloaded: bool = False  # False when served from the cache or a local path
