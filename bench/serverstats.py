"""What a cell costs inside the server: mean executed batch size and frontend CPU per request.

- Mean executed batch: rows over model executions, both deltas over the cell's timed
  repetitions. This server: ``model_server_batch_size_rows`` (a histogram of rows per
  ONNX Runtime call, summed over workers) read from ``/metrics``: Δ``_sum`` / Δ``_count``.
  Triton: ``nv_inference_count`` (inferences, i.e. rows) / ``nv_inference_exec_count``
  (executions) from its metrics port.
- Frontend CPU µs/request: user+system CPU time of the frontend processes (psutil), delta
  over the repetitions, divided by the requests the load generator completed in them.

Parsing and arithmetic are pure; the peers do the reading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]

OURS_BATCH_METRIC = "model_server_batch_size_rows"
TRITON_ROWS_METRIC = "nv_inference_count"
TRITON_EXECS_METRIC = "nv_inference_exec_count"
OURS_REQUESTS_METRIC = "model_server_requests_total"
TRITON_SUCCESS_METRIC, TRITON_FAILURE_METRIC = "nv_inference_request_success", "nv_inference_request_failure"


def parse_prometheus(text: str) -> dict[str, list[tuple[Labels, float]]]:
    """Prometheus text exposition -> samples by metric name (comments and bad lines skipped)."""
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, raw_labels, raw_value = match.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(raw_labels or "")))
        samples.setdefault(name, []).append((labels, value))
    return samples


def total(samples: dict[str, list[tuple[Labels, float]]], name: str, model: str) -> float:
    """Sum of ``name`` over every label set whose ``model`` label is ``model`` (all workers)."""
    return sum(value for labels, value in samples.get(name, []) if ("model", model) in labels)


@dataclass(frozen=True)
class BatchCounters:
    """Rows executed and model executions so far, for one model."""

    rows: float
    executions: float


def ours_batch_counters(metrics_text: str, model: str) -> BatchCounters:
    samples = parse_prometheus(metrics_text)
    return BatchCounters(
        rows=total(samples, OURS_BATCH_METRIC + "_sum", model),
        executions=total(samples, OURS_BATCH_METRIC + "_count", model),
    )


def triton_batch_counters(metrics_text: str, model: str) -> BatchCounters:
    samples = parse_prometheus(metrics_text)
    return BatchCounters(
        rows=total(samples, TRITON_ROWS_METRIC, model),
        executions=total(samples, TRITON_EXECS_METRIC, model),
    )


@dataclass(frozen=True)
class RequestCounters:
    """Inference calls of one model the server answered so far: successes and failures."""

    success: float
    failure: float


def ours_grpc_requests(metrics_text: str, model: str) -> RequestCounters:
    """This server's gRPC calls of ``model`` (``protocol="grpc"``; status 200 is a success)."""
    success = failure = 0.0
    for labels, value in parse_prometheus(metrics_text).get(OURS_REQUESTS_METRIC, []):
        found = dict(labels)
        if found.get("model") == model and found.get("protocol") == "grpc":
            if found.get("status") == "200":
                success += value
            else:
                failure += value
    return RequestCounters(success, failure)


def triton_requests(metrics_text: str, model: str) -> RequestCounters:
    """Triton's inference requests of ``model`` (every protocol: the cell sends only gRPC)."""
    samples = parse_prometheus(metrics_text)
    return RequestCounters(
        total(samples, TRITON_SUCCESS_METRIC, model), total(samples, TRITON_FAILURE_METRIC, model)
    )


def mean_batch(before: BatchCounters | None, after: BatchCounters | None) -> float | None:
    """Mean rows per execution between two readings; None when unknown or nothing ran."""
    if before is None or after is None:
        return None
    executions = after.executions - before.executions
    if executions <= 0:
        return None
    return (after.rows - before.rows) / executions


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """user+system CPU seconds of each live process in ``pids``."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = times.user + times.system
    return out


def cpu_us_per_request(before: dict[int, float], after: dict[int, float], requests: int) -> float | None:
    """Frontend CPU per request in µs: the processes present at both readings, over ``requests``.

    A process that died or appeared in between is left out rather than counted from zero
    (a restarted frontend would otherwise add its whole life to the cell)."""
    if requests <= 0 or not before:
        return None
    spent = sum(after[pid] - before[pid] for pid in before if pid in after)
    value = spent / requests * 1e6
    return None if math.isnan(value) else value
