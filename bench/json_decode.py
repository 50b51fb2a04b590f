"""What decoding a JSON tensor's ``data`` costs: today's orjson + numpy path against ``json_tensors``.

The slow path is orjson (a Python float per element) then ``tensors.from_json``
(numpy over the nested lists); the fast path is ``decode_numeric`` over the raw
text of the same ``data`` value. Both get the bytes of the value alone, as the
msgspec envelope hands them over. Bodies::

    cnn        1x3x224x224 FP32, flat, 4 decimals (the body ``make bench`` sends)
    cnn-full   the same at full precision with ", " separators (tritonclient's json.dumps)
    cnn-nested the full-precision image as nested lists (``tensor.tolist()``)
    tabular    1x30 FP32, 4 decimals

Run ``python -m bench.json_decode`` (``--rounds`` per body): the median and
least CPU µs of each path, after checking both give the same bytes. The tabular row is
below ``json_tensors.MIN_ELEMENTS``, so the fast path is timed with ``min_elements=0``
there to show why it is left to the slow path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import orjson

from bench.models import REFERENCE_MODELS, sample_input
from bench.payloads import json_data
from frontend.json_tensors import decode_numeric
from frontend.tensors import from_json


def bodies() -> dict[str, tuple[bytes, list[int]]]:
    cnn = sample_input(REFERENCE_MODELS["cnn"], 1)
    full = np.random.default_rng(1).standard_normal(cnn.shape).astype(np.float32)
    tabular = sample_input(REFERENCE_MODELS["tabular"], 1)
    return {
        "cnn": (json.dumps(json_data(cnn), separators=(",", ":")).encode(), list(cnn.shape)),
        "cnn-full": (json.dumps(full.ravel().tolist()).encode(), list(full.shape)),
        "cnn-nested": (orjson.dumps(full.tolist()), list(full.shape)),
        "tabular": (json.dumps(json_data(tabular), separators=(",", ":")).encode(), list(tabular.shape)),
    }


def _cpu_us(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """CPU µs of this process per call (not wall time: the 2-core machine is shared), the paths
    taking turns call by call so that a busy spell of the machine weighs on both alike."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            started = time.process_time_ns()
            fn()
            samples[name].append((time.process_time_ns() - started) / 1000)
    return samples


def measure(raw: bytes, shape: list[int], rounds: int) -> dict[str, float]:
    slow = from_json(orjson.loads(raw), "FP32", "input 'x'", shape)
    fast = decode_numeric(raw, "FP32", shape, min_elements=0)
    if fast is None or fast.tobytes() != slow.tobytes():
        raise SystemExit("the fast path did not decode the body to the slow path's bytes")
    samples = _cpu_us(
        {
            "slow": lambda: from_json(orjson.loads(raw), "FP32", "input 'x'", shape),
            "fast": lambda: decode_numeric(raw, "FP32", shape, min_elements=0),
        },
        rounds,
    )
    slow_us, fast_us = statistics.median(samples["slow"]), statistics.median(samples["fast"])
    # The least is what a call costs when other processes leave the caches and memory bus alone.
    slow_min, fast_min = min(samples["slow"]), min(samples["fast"])
    return {
        "bytes": len(raw),
        "slow_us": slow_us,
        "fast_us": fast_us,
        "ratio": slow_us / fast_us,
        "slow_min": slow_min,
        "fast_min": fast_min,
        "ratio_min": slow_min / fast_min,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=0, help="per body (default: 60 large, 5000 small)")
    args = parser.parse_args(argv)
    print("| body | bytes | orjson + from_json µs | decode_numeric µs | ratio | least µs, both | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (raw, shape) in bodies().items():
        rounds = args.rounds or (60 if len(raw) > 100_000 else 5000)
        r = measure(raw, shape, rounds)
        print(
            f"| {name} | {r['bytes']:,} | {r['slow_us']:,.1f} | {r['fast_us']:,.1f} | {r['ratio']:.2f}x "
            f"| {r['slow_min']:,.1f} / {r['fast_min']:,.1f} | {r['ratio_min']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
