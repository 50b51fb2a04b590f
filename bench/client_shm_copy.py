"""What reading a client's shared-memory region through ``pread`` costs next to a mapped view.

The worker reads client regions with ``ipc.client_shm.read`` (open with O_NOFOLLOW,
fstat, preadv into private memory, close) instead of mapping them, so a region
truncated under it cannot raise SIGBUS. This measures both ways of getting a tensor
into a numpy array onnxruntime can take, per tensor size::

    python -m bench.client_shm_copy            # 64 KiB and 4 MiB, 2000 / 200 rounds
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from ipc import client_shm
from ipc.arena import SHM_DIR


def _time_us(fn: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return statistics.median(samples)


def measure(nbytes: int, rounds: int) -> dict[str, float]:
    name = f"bench_client_shm_{os.getpid()}"
    path = SHM_DIR / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        os.pwrite(fd, np.random.default_rng(0).normal(size=nbytes // 4).astype(np.float32).tobytes(), 0)
        mm = mmap.mmap(fd, nbytes)
        view = memoryview(mm)
        try:
            # Mapped once and kept (the old worker path): a zero-copy view per request.
            mapped = _time_us(lambda: np.frombuffer(view, dtype=np.float32), rounds)
            # Open, fstat and read per request (the worker's path now): one copy.
            pread = _time_us(lambda: client_shm.read(name, 0, nbytes), rounds)
            # What onnxruntime touches anyway: one pass over the tensor's bytes.
            touch = _time_us(lambda: np.frombuffer(view, dtype=np.float32).sum(), rounds)
            # And pwrite of an output of the same size.
            out = np.ones(nbytes, dtype=np.uint8).data
            pwrite = _time_us(lambda: client_shm.write(name, 0, out), rounds)
        finally:
            view.release()
            mm.close()
    finally:
        os.close(fd)
        path.unlink()
    return {"mapped_view_us": mapped, "pread_us": pread, "pwrite_us": pwrite, "one_pass_sum_us": touch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="65536:2000,4194304:200", help="bytes:rounds, comma-separated")
    args = parser.parse_args()
    for item in args.sizes.split(","):
        size, rounds = (int(v) for v in item.split(":"))
        result = measure(size, rounds)
        cells = ", ".join(f"{k} {v:.1f}" for k, v in result.items())
        print(f"{size // 1024} KiB: {cells} (median of {rounds})")


if __name__ == "__main__":
    main()
