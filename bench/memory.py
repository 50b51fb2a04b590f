"""Peak memory of a peer: the RSS of its whole process tree, sampled every 200 ms.

RSS summed over processes counts a shared page once per process that touched it
(shared-memory arenas, forked copy-on-write pages), so the sampler also records the
proportional set size (PSS, each shared page split among its users) every fifth
sample; PSS is the fairer figure when processes share memory, RSS is what the issue
asks for. Both are peaks over the peer's whole life (start, load, every cell, stop).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil

INTERVAL_S = 0.2
PSS_EVERY = 5


@dataclass
class MemoryPeak:
    rss_bytes: int = 0
    pss_bytes: int = 0
    processes: int = 0  # most processes seen at once
    samples: int = 0


def tree(roots: list[int]) -> list[psutil.Process]:
    processes: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            processes[pid] = root
            for child in root.children(recursive=True):
                processes[child.pid] = child
        except psutil.Error:
            continue
    return list(processes.values())


def sample(roots: list[int], with_pss: bool) -> tuple[int, int, int]:
    """(RSS sum, PSS sum or 0, process count) of the trees under ``roots``."""
    rss = pss = count = 0
    for proc in tree(roots):
        try:
            if with_pss:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
            else:
                rss += proc.memory_info().rss
            count += 1
        except psutil.Error:
            continue
    return rss, pss, count


class MemorySampler:
    """Background thread tracking the peak of ``roots()``'s process trees."""

    def __init__(self, roots: Callable[[], list[int]], interval_s: float = INTERVAL_S) -> None:
        self._roots = roots
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self.peak = MemoryPeak()

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> MemoryPeak:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=5)
        return self.peak

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            roots = self._roots()
            if roots:
                rss, pss, count = sample(roots, with_pss=tick % PSS_EVERY == 0)
                peak = self.peak
                peak.rss_bytes = max(peak.rss_bytes, rss)
                peak.pss_bytes = max(peak.pss_bytes, pss)
                peak.processes = max(peak.processes, count)
                peak.samples += 1
                tick += 1
            self._stop.wait(self._interval)
