"""Remote artifact fetches: bounded in total and per source, so one slow source cannot starve others.

A source that accepts connections and never answers holds its fetch threads for
as long as its client's own timeouts and retries allow (minutes for botocore).
The coordinator fails such a load after ``download_timeout_s`` without progress
(``CoordinatorCore.tick``), but the thread cannot be interrupted; so each source
gets at most ``per_source`` threads, all remote sources together at most
``total``, and local artifacts have a pool of their own. A fetch waits in a FIFO
until its source and the pool have room; one whose load is no longer waiting
for it (timed out or unloaded while queued) is dropped before it starts.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from .core import Fetch

log = logging.getLogger(__name__)


class SourcePool:
    def __init__(self, total: int, per_source: int, run: Callable[[Fetch], None]) -> None:
        self.total = total
        self.per_source = per_source
        self._run = run
        self._lock = threading.Lock()
        self._queue: deque[Fetch] = deque()
        self._running: dict[str, int] = {}
        self._closed = False

    def submit(self, fetch: Fetch) -> None:
        with self._lock:
            self._queue.append(fetch)
            self._start_ready()

    def retain(self, live: set[int]) -> None:
        """Drop queued fetches whose token no load waits on any more."""
        with self._lock:
            if any(f.token not in live for f in self._queue):
                self._queue = deque(f for f in self._queue if f.token in live)

    def running(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()

    def _start_ready(self) -> None:
        """Start every queued fetch there is room for, in order (caller holds the lock)."""
        if self._closed:
            return
        waiting: deque[Fetch] = deque()
        while self._queue:
            fetch = self._queue.popleft()
            busy = self._running.get(fetch.source, 0)
            if sum(self._running.values()) >= self.total or busy >= self.per_source:
                waiting.append(fetch)
                continue
            self._running[fetch.source] = busy + 1
            # Daemon: a thread stuck in a source's client must not hold the process at exit.
            threading.Thread(
                target=self._work, args=(fetch,), name=f"fetch-{fetch.source}", daemon=True
            ).start()
        self._queue = waiting

    def _work(self, fetch: Fetch) -> None:
        try:
            self._run(fetch)
        except Exception:  # _run reports its own failures; this is a last line of defence
            log.exception("remote fetch of %s:%s failed", *fetch.key)
        finally:
            with self._lock:
                left = self._running[fetch.source] - 1
                if left:
                    self._running[fetch.source] = left
                else:
                    del self._running[fetch.source]
                self._start_ready()
