"""Dynamic batching: merge queued requests by rows, split outputs back by offsets.

Pure functions and a per-model queue, no sockets and no ONNX Runtime, so the
merge/split can be property-tested. Rows are counted on the leading dimension
of the inputs; ``max_batch_size`` caps **rows**, not requests. A request larger
than the cap runs alone, never merged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One request waiting in a model's queue; ``item`` is whatever the caller needs back."""

    item: T
    feeds: dict[str, Array]
    rows: int
    arrival_ns: int
    signature: tuple[Any, ...]  # requests merge only with equal signatures


@dataclass(frozen=True)
class Policy:
    max_batch_size: int
    max_queue_delay_ns: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024


def rows_of(feeds: dict[str, Array]) -> int:
    """Leading dimension shared by every input (-1 when they disagree or are scalars)."""
    dims = {arr.shape[0] if arr.ndim else -1 for arr in feeds.values()}
    return dims.pop() if len(dims) == 1 else -1


def signature_of(feeds: dict[str, Array], output_names: Sequence[str]) -> tuple[Any, ...]:
    """Inputs merge when names, dtypes and trailing dimensions agree and outputs asked are the same."""
    return (
        tuple(sorted((name, arr.dtype.str, arr.shape[1:]) for name, arr in feeds.items())),
        tuple(output_names),
    )


def merge(feeds_list: Sequence[dict[str, Array]]) -> dict[str, Array]:
    if len(feeds_list) == 1:
        return feeds_list[0]
    return {name: np.concatenate([f[name] for f in feeds_list], axis=0) for name in feeds_list[0]}


def split(outputs: Sequence[Array], row_counts: Sequence[int]) -> list[list[Array]]:
    """Per request, its rows of every output (views, no copy).

    Raises ValueError when an output's leading dimension is not the merged row
    count: such a model cannot be split and must not be batched.
    """
    total = sum(row_counts)
    for out in outputs:
        if out.ndim == 0 or out.shape[0] != total:
            raise ValueError(f"output leading dimension {out.shape[:1]} is not the batch's {total} rows")
    bounds = np.cumsum([0, *row_counts])
    return [[out[bounds[i] : bounds[i + 1]] for out in outputs] for i in range(len(row_counts))]


@dataclass
class ModelQueue(Generic[T]):
    """Requests for one model waiting to be merged."""

    policy: Policy
    pending: deque[Pending[T]] = field(default_factory=deque)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pending)

    def full(self) -> bool:
        return len(self.pending) >= self.policy.max_queue_size

    def due_ns(self) -> int | None:
        """When the oldest request has waited its allowance."""
        if not self.pending:
            return None
        return self.pending[0].arrival_ns + self.policy.max_queue_delay_ns

    def ready(self, now_ns: int) -> bool:
        if not self.pending:
            return False
        rows = self.rows
        if rows >= self.policy.max_batch_size or rows in self.policy.preferred_batch_sizes:
            return True
        due = self.due_ns()
        return due is not None and now_ns >= due

    def take(self) -> list[Pending[T]]:
        """The next batch: oldest first, same signature, at most max_batch_size rows.

        A request of more rows than the cap is taken alone. Requests of another
        signature stay queued, in order, for a later batch.
        """
        first = self.pending.popleft()
        batch = [first]
        if first.rows >= self.policy.max_batch_size:
            return batch
        rows = first.rows
        target = self.policy.max_batch_size
        preferred = [p for p in self.policy.preferred_batch_sizes if p <= target]
        kept: deque[Pending[T]] = deque()
        while self.pending:
            candidate = self.pending.popleft()
            if candidate.signature == first.signature and rows + candidate.rows <= target:
                batch.append(candidate)
                rows += candidate.rows
                if rows == target or (rows in preferred and not self._can_reach(rows, target)):
                    break
            else:
                kept.append(candidate)
        kept.extend(self.pending)
        self.pending = kept
        return batch

    def _can_reach(self, rows: int, target: int) -> bool:
        """Whether queued requests could grow this batch to a larger preferred size."""
        larger = [p for p in self.policy.preferred_batch_sizes if rows < p <= target]
        return bool(larger) and rows + sum(p.rows for p in self.pending) >= min(larger)
