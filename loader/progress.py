"""Download progress: throttled ``Progress`` events to subscribers, log lines for large artifacts.

A :class:`DownloadMeter` belongs to one download. The thread that downloads calls
:meth:`~DownloadMeter.advance` per chunk; every subscribed callback (the loader
that started the download and any loader that joined it, see ``loader.cache``)
gets at most one event per ``PROGRESS_INTERVAL_S`` plus the first and the last.
Callbacks run on the downloading thread and must be quick; an exception in one
is logged and ignored.

Artifacts of at least ``LOG_MIN_BYTES`` also get INFO lines with bytes, percent
and rate every ``LOG_STEP_PERCENT`` percent or ``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from .artifact import Progress, ProgressCallback
from .redact import redact

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PROGRESS_INTERVAL_S = 0.25
LOG_MIN_BYTES = 32 * MiB
LOG_INTERVAL_S = 5.0
LOG_STEP_PERCENT = 10.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns


class DownloadMeter:
    """Counts the bytes of one download and fans progress out to subscribers."""

    def __init__(self, label: str, total: int = 0) -> None:
        self.label = redact(label)
        self.total = max(total, 0)
        self.done = 0
        self._lock = threading.Lock()
        self._subscribers: list[ProgressCallback] = []
        self._started = time.monotonic()
        self._last_emit = float("-inf")
        self._last_log = self._started
        self._last_log_percent = 0.0
        self._finished = False

    # --- subscribers ------------------------------------------------------------------
    def subscribe(self, callback: ProgressCallback) -> None:
        """Add a callback; it gets the current progress at once (its load is now downloading)."""
        with self._lock:
            self._subscribers.append(callback)
            event = self._event()
        self._call(callback, event)

    def _event(self) -> Progress:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return Progress(done=self.done, total=max(self.total, self.done), rate_bps=rate)

    def _call(self, callback: ProgressCallback, event: Progress) -> None:
        try:
            callback(event)
        except Exception:
            log.warning("progress callback failed for %s", self.label, exc_info=True)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_emit < PROGRESS_INTERVAL_S:
            return
        self._last_emit = now
        with self._lock:
            subscribers = list(self._subscribers)
            event = self._event()
        for callback in subscribers:
            self._call(callback, event)
        self._maybe_log(event, now, force)

    # --- the downloading thread -------------------------------------------------------
    def start(self) -> None:
        log.info("downloading %s (%s)", self.label, human_bytes(self.total) if self.total else "size unknown")
        self._emit(force=True)

    def add_total(self, nbytes: int) -> None:
        """More bytes to fetch than first announced (e.g. ONNX external data)."""
        self.total += max(nbytes, 0)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self._emit()

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.total = self.done
        self._emit(force=True)
        elapsed = time.monotonic() - self._started
        log.info(
            "downloaded %s: %s in %.1f s (%s/s)",
            self.label,
            human_bytes(self.done),
            elapsed,
            human_bytes(self.done / elapsed if elapsed > 0 else 0.0),
        )

    def _maybe_log(self, event: Progress, now: float, force: bool) -> None:
        if event.total < LOG_MIN_BYTES or force:
            return
        percent = event.percent
        if percent - self._last_log_percent < LOG_STEP_PERCENT and now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        self._last_log_percent = percent
        log.info(
            "downloading %s: %s of %s (%.0f%%) at %s/s",
            self.label,
            human_bytes(event.done),
            human_bytes(event.total),
            percent,
            human_bytes(event.rate_bps),
        )
