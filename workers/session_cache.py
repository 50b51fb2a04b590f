"""A worker's ONNX sessions, kept in least-recently-used order under a budget.

Threads: the serving thread ``acquire``s a session for each batch and
``release``s it after; the control thread ``put``s loaded sessions and
``remove``s unloaded ones. One lock guards the table; ONNX Runtime runs outside
it. A session with requests in flight (``pins > 0``) is never evicted, and an
unload waits for its pins to drop to zero ("requests already running finish
first").
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Key = tuple[str, str]
T = TypeVar("T")


class BudgetExceeded(Exception):
    """The model cannot fit this worker's budget, now (all pinned) or ever."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class Entry(Generic[T]):
    key: Key
    value: T
    nbytes: int
    pins: int = 0
    closing: bool = False
    # Unload asked: stop new acquisitions once the serving thread has taken every
    # request that arrived before this time (monotonic ns); 0 = not asked.
    close_after_ns: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SessionCache(Generic[T]):
    def __init__(self, max_models: int = 0, max_bytes: int = 0) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, Entry[T]] = OrderedDict()
        self._lock = threading.Lock()
        self._unpinned = threading.Condition(self._lock)
        self.evictions = 0

    # --- serving thread --------------------------------------------------------
    def acquire(self, key: Key) -> Entry[T] | None:
        """Pin and return the session, or None when absent or being unloaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.closing:
                return None
            entry.pins += 1
            entry.last_used = time.monotonic()
            self._entries.move_to_end(key)
            return entry

    def release(self, entry: Entry[T]) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0:
                self._unpinned.notify_all()

    # --- control thread -----------------------------------------------------------
    def make_room(self, nbytes: int, exclude: Key | None = None) -> list[Key]:
        """Evict least-recently-used unpinned sessions until ``nbytes`` more fit.

        Returns the evicted keys; raises BudgetExceeded when pinned sessions
        (or the budget itself) leave no room.
        """
        with self._lock:
            if self.max_bytes and nbytes > self.max_bytes:
                raise BudgetExceeded(
                    f"model needs {nbytes} bytes, more than the worker budget "
                    f"MODEL_SERVER_WORKER_MAX_BYTES={self.max_bytes}",
                    permanent=True,
                )
            # Choose every victim first and evict only if they free enough: a refused load
            # must not drop sessions. Sessions in flight or being unloaded are never chosen.
            candidates = [
                e
                for k, e in self._entries.items()
                if e.pins == 0 and not e.closing and not e.close_after_ns and k != exclude
            ]
            chosen: list[Entry[T]] = []
            while not self._fits(nbytes, exclude, {e.key for e in chosen}):
                if not candidates:
                    raise BudgetExceeded(
                        "worker budget is full and every loaded model has requests in flight", permanent=False
                    )
                chosen.append(candidates.pop(0))
            for victim in chosen:
                del self._entries[victim.key]
                self.evictions += 1
            if chosen:
                self._unpinned.notify_all()
            return [victim.key for victim in chosen]

    def _fits(self, nbytes: int, exclude: Key | None, leaving: set[Key] | None = None) -> bool:
        gone = leaving or set()
        entries = [e for k, e in self._entries.items() if k != exclude and k not in gone]
        if self.max_models and len(entries) + 1 > self.max_models:
            return False
        return not (self.max_bytes and sum(e.nbytes for e in entries) + nbytes > self.max_bytes)

    def put(self, key: Key, value: T, nbytes: int) -> None:
        with self._lock:
            self._entries[key] = Entry(key, value, nbytes)
            self._entries.move_to_end(key)

    def remove(self, key: Key, grace_ns: int = 0, timeout: float | None = None) -> bool:
        """Unload: let requests already sent to this worker through, wait for in-flight ones, drop.

        Requests that frontends sent before they learned of the unload may still
        sit in the serving socket behind a long inference. So the serving thread,
        not this one, closes the entry (``close_due``): once ``grace_ns`` has passed
        and it has found the socket empty. Returns False when the key was absent or
        the wait timed out (the session then stays closing and a later call drops it).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if not entry.close_after_ns:
                entry.close_after_ns = time.monotonic_ns() + grace_ns

            def done() -> bool:
                return self._entries.get(key) is not entry or (entry.closing and entry.pins == 0)

            if not self._unpinned.wait_for(done, timeout=timeout):
                return False
            if self._entries.get(key) is entry:
                del self._entries[key]
            return True

    def close_due(self, now_ns: int) -> int:
        """Serving thread, with its socket drained: close entries whose unload grace has passed."""
        closed = 0
        with self._lock:
            for entry in self._entries.values():
                if entry.close_after_ns and not entry.closing and now_ns >= entry.close_after_ns:
                    entry.closing = True
                    closed += 1
            if closed:
                self._unpinned.notify_all()
        return closed

    def next_close_ns(self) -> int | None:
        with self._lock:
            due = [e.close_after_ns for e in self._entries.values() if e.close_after_ns and not e.closing]
        return min(due) if due else None

    # --- introspection ----------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._entries.get(key)  # type: ignore[call-overload]
            return entry is not None and not entry.closing

    def held(self) -> list[Key]:
        """Ready keys, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if not e.closing]

    def get(self, key: Key) -> Entry[T] | None:
        with self._lock:
            return self._entries.get(key)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    @property
    def inflight(self) -> int:
        with self._lock:
            return sum(e.pins for e in self._entries.values())
