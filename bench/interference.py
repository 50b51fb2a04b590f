"""How much CPU other processes took while a cell ran ("busy elsewhere").

On a shared 2-core machine a test suite or an editor in the background changes the
numbers. For each cell: system-wide busy CPU time (including steal, time the
hypervisor gave to other guests) minus the CPU time of the peer's process tree minus
the harness's own (wrk, Python clients and onnxruntime runs are the harness's waited-for
children), as a percentage of all cores over the cell's wall time. A few percent is
normal (kernel threads, the memory sampler); much more means the cell's numbers are
perturbed, and the report says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil

from bench.memory import tree


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def tree_seconds(roots: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for proc in tree(roots):
        try:
            cpu = proc.cpu_times()
            out[proc.pid] = cpu.user + cpu.system
        except psutil.Error:
            continue
    return out


class CpuAccount:
    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self._roots = roots
        self._start = time.monotonic()
        self._busy = busy_seconds()
        self._own = own_seconds()
        self._tree = tree_seconds(roots())

    def foreign_pct(self) -> float:
        wall = time.monotonic() - self._start
        busy = busy_seconds() - self._busy
        own = own_seconds() - self._own
        peer = sum(cpu - self._tree.get(pid, 0.0) for pid, cpu in tree_seconds(self._roots()).items())
        cores = os.cpu_count() or 1
        if wall <= 0:
            return 0.0
        return max(0.0, busy - own - peer) / (wall * cores) * 100.0
