"""Triton's statistics extension (``GET /v2/models[/{m}[/versions/{v}]]/stats``).

Every frontend and worker process writes its counters to the Prometheus
multiprocess directory; this module sums them per (model, version), so any
frontend answers for the whole server, the same numbers ``/metrics`` shows:

- ``success`` / ``fail``: requests and their time in the frontend (receipt to response);
- ``queue``: time in the worker before the ONNX Runtime call (batching delay included);
- ``compute_infer``: the ONNX Runtime call;
- ``inference_count`` (rows) and ``execution_count`` (ONNX Runtime calls), so their
  ratio is the mean executed batch; ``last_inference`` in ms since the epoch.

``compute_input`` / ``compute_output`` are reported as zero: inputs are views of
shared memory and outputs are written in place, not timed apart from the call.
``batch_stats`` is empty: batch sizes are kept as a histogram (``/metrics``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from model_server import metrics

Key = tuple[str, str]
NS = 1e9


class ModelStats:
    __slots__ = ("counts", "executions", "last_ms", "ns", "rows")

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)
        self.ns: dict[str, float] = defaultdict(float)
        self.rows = 0.0
        self.executions = 0.0
        self.last_ms = 0.0

    def duration(self, phase: str) -> dict[str, int]:
        return {"count": int(self.counts[phase]), "ns": round(self.ns[phase])}

    def as_triton(self, model: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {
            "name": model,
            "version": version,
            "last_inference": int(self.last_ms),
            "inference_count": int(self.rows),
            "execution_count": int(self.executions),
            "inference_stats": {
                "success": self.duration("success"),
                "fail": self.duration("fail"),
                "queue": self.duration("queue"),
                "compute_input": zero,
                "compute_infer": self.duration("compute_infer"),
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [],
        }


# histogram -> the statistics phase its _count and _sum feed (request duration: its outcome label)
_PHASES = {
    "model_server_queue_duration_seconds": "queue",
    "model_server_compute_duration_seconds": "compute_infer",
}


def collect() -> dict[Key, ModelStats]:
    """Sum every process's samples per (model, version)."""
    found: dict[Key, ModelStats] = defaultdict(ModelStats)
    for family in metrics.process_registry().collect():
        for sample in family.samples:
            labels = sample.labels
            if "model" not in labels or "version" not in labels:
                continue
            stats = found[(labels["model"], labels["version"])]
            suffix = sample.name.removeprefix(family.name)  # "_count", "_sum", "_bucket" or ""
            phase = _PHASES.get(family.name, "")
            if family.name == "model_server_request_duration_seconds":
                phase = labels.get("outcome", "")
            if phase and suffix == "_count":
                stats.counts[phase] += sample.value
            elif phase and suffix == "_sum":
                stats.ns[phase] += sample.value * NS
            elif family.name == "model_server_batch_size_rows" and suffix == "_count":
                stats.executions += sample.value
            elif family.name == "model_server_batch_size_rows" and suffix == "_sum":
                stats.rows += sample.value
            elif family.name == "model_server_last_inference_timestamp_ms":
                stats.last_ms = max(stats.last_ms, sample.value)
    return found


def model_stats(keys: list[Key]) -> dict[str, Any]:
    """The ``model_stats`` body for these models, zeros for a model with no traffic yet."""
    found = collect()
    return {"model_stats": [found.get(key, ModelStats()).as_triton(*key) for key in keys]}
