"""Result records of one repetition and one cell, and the medians the report uses (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Rep:
    """One timed repetition of one cell."""

    requests: int  # completed calls (HTTP responses, or onnxruntime runs)
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0  # socket errors + timeouts + HTTP status >= 400
    mean_ms: float = 0.0
    p90_ms: float = 0.0
    max_ms: float = 0.0
    error_detail: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rps"] = round(self.rps, 3)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rep:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


SKIPPED = "skipped: "


@dataclass
class Cell:
    """One measured configuration: peer x model x path x concurrency x batch."""

    peer: str
    model: str  # reference model: tabular, mlp, cnn
    path: str  # v2-json, v2-binary, v1-records, py-binary, py-shm, in-process
    concurrency: int
    batch: int = 1
    batching: bool = False  # served with dynamic batching on
    served_as: str = ""  # model id on the server
    client: str = ""  # the load generator, e.g. "wrk 4.1.0, 2 threads"
    reps: list[Rep] = field(default_factory=list)
    error: str | None = None  # why the cell has no numbers ("skipped: ..." when not applicable)
    busy_elsewhere_pct: float = 0.0  # CPU other processes used during the cell (% of all cores)
    mean_batch_rows: float | None = None  # rows per model execution over the timed repetitions
    frontend_cpu_us: float | None = None  # frontend processes' CPU per completed request, µs

    @property
    def skipped(self) -> bool:
        return self.error is not None and self.error.startswith(SKIPPED)

    @property
    def key(self) -> tuple[str, str, str, int, int, bool]:
        return (self.peer, self.model, self.path, self.concurrency, self.batch, self.batching)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.reps)

    def median(self, metric: str) -> float:
        values = [float(getattr(rep, metric)) for rep in self.reps]
        return statistics.median(values) if values else float("nan")

    @property
    def rps(self) -> float:
        return self.median("rps")

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.batch

    @property
    def p50_ms(self) -> float:
        return self.median("p50_ms")

    @property
    def p99_ms(self) -> float:
        return self.median("p99_ms")

    @property
    def errors(self) -> int:
        return sum(rep.errors for rep in self.reps)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reps"] = [rep.to_json() for rep in self.reps]
        if self.ok:
            data["median"] = {
                "rps": round(self.rps, 3),
                "rows_per_s": round(self.rows_per_s, 3),
                "p50_ms": round(self.p50_ms, 4),
                "p99_ms": round(self.p99_ms, 4),
                "errors": self.errors,
            }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "reps"}
        return cls(**fields, reps=[Rep.from_json(rep) for rep in data.get("reps", [])])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100.0 * len(sorted_values) + 0.5 - 1e-9))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def rep_from_latencies(latencies_s: Sequence[float], duration_s: float, errors: int = 0) -> Rep:
    """A repetition from per-call latencies in seconds (Python client, raw onnxruntime)."""
    ordered = sorted(latencies_s)
    mean = sum(ordered) / len(ordered) if ordered else float("nan")
    return Rep(
        requests=len(ordered),
        duration_s=duration_s,
        p50_ms=percentile(ordered, 50) * 1e3,
        p99_ms=percentile(ordered, 99) * 1e3,
        p90_ms=percentile(ordered, 90) * 1e3,
        max_ms=(ordered[-1] * 1e3) if ordered else float("nan"),
        mean_ms=mean * 1e3,
        errors=errors,
    )
