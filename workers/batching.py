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
    """Requests for one model waiting to be merged.

    The policy is Triton's dynamic batcher's: a batch is cut as soon as the queue
    holds a full batch's worth of rows or can form a preferred size; otherwise it
    waits until its oldest request has waited ``max_queue_delay_ns``, then takes
    whatever is there. The caller drains its socket before asking, so "the queue"
    is everything already sent to this worker, not what arrived in one window.
    """

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
        """Whether a batch should run now rather than wait for more requests."""
        if not self.pending:
            return False
        if self.rows >= self.policy.max_batch_size:
            return True  # waiting cannot make the batch bigger: the delay is only for short queues
        due = self.due_ns()
        if due is not None and now_ns >= due:
            return True
        return self._preferred_cut(self._candidates()[1]) is not None

    def take(self) -> list[Pending[T]]:
        """The next batch: oldest first, same signature, at most max_batch_size rows.

        The largest preferred size the queue can form is cut; without one, the
        batch takes every request of the head's signature that fits. A request
        of more rows than the cap is taken alone. Requests left out stay queued,
        in order, for a later batch.
        """
        if self.pending[0].rows >= self.policy.max_batch_size:
            return [self.pending.popleft()]
        members, totals = self._candidates()
        cut = self._preferred_cut(totals)
        chosen = set(members[: cut if cut is not None else len(members)])
        batch = [p for i, p in enumerate(self.pending) if i in chosen]
        self.pending = deque(p for i, p in enumerate(self.pending) if i not in chosen)
        return batch

    def _candidates(self) -> tuple[list[int], list[int]]:
        """Queue positions a batch started by the head would take greedily, and its rows after each."""
        cap = self.policy.max_batch_size
        signature = self.pending[0].signature
        members: list[int] = []
        totals: list[int] = []
        rows = 0
        for i, p in enumerate(self.pending):
            if p.signature == signature and rows + p.rows <= cap:
                rows += p.rows
                members.append(i)
                totals.append(rows)
                if rows == cap:
                    break
        return members, totals

    def _preferred_cut(self, totals: list[int]) -> int | None:
        """How many candidates make the largest preferred size they can form exactly (None: none)."""
        preferred = self.policy.preferred_batch_sizes
        if not preferred:
            return None
        best: int | None = None
        for count, rows in enumerate(totals, start=1):
            if rows in preferred:
                best = count  # totals grow, so a later hit is a larger size
        return best
