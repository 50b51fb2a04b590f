"""Raw onnxruntime in-process: the limit a server is measured against.

Run as its own process (``python -m bench.ort_raw MODEL.onnx --batch 1 ...``) so its
memory is measured apart from the harness. One InferenceSession on the CPU provider
with the session options the benchmark gives every peer (one intra-op thread); a loop
of ``session.run`` on a pre-built input for a fixed time; each call is timed. Prints
one JSON document: ``{"reps": [...]}`` with calls, duration and latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.models import REFERENCE_MODELS, sample_input
from bench.ort_options import session_options
from bench.stats import rep_from_latencies


def measure(
    model_path: Path, model_name: str, batch: int, duration_s: float, warmup_s: float, reps: int
) -> list[dict[str, object]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), session_options(), providers=["CPUExecutionProvider"])
    spec = REFERENCE_MODELS[model_name]
    feeds = {spec.input.name: np.ascontiguousarray(sample_input(spec, batch))}
    run = session.run
    clock = time.perf_counter
    end = clock() + warmup_s
    while clock() < end:
        run(None, feeds)
    results = []
    for _ in range(reps):
        latencies: list[float] = []
        append = latencies.append
        start = clock()
        deadline = start + duration_s
        now = start
        while now < deadline:
            run(None, feeds)
            after = clock()
            append(after - now)
            now = after
        results.append(rep_from_latencies(latencies, now - start).to_json())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path", type=Path)
    parser.add_argument("--name", required=True, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    reps = measure(args.model_path, args.name, args.batch, args.duration, args.warmup, args.reps)
    json.dump({"reps": reps}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
