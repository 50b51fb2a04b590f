"""What every process role does first: title, logging, signal flags.

Signal handlers only set a flag (and count): the role's main loop notices it.
A second SIGTERM/SIGINT while shutting down forces the exit, as in uvicorn.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from setproctitle import setproctitle

from . import logs
from .rundir import prepare_run_dir
from .settings import Settings

log = logging.getLogger(__name__)


class ShutdownFlag:
    """Set by SIGTERM/SIGINT; a second signal exits at once with ``force_code``."""

    def __init__(self, force_code: int = 1) -> None:
        self.event = threading.Event()
        self.force_code = force_code
        self.signals = 0

    def install(self) -> ShutdownFlag:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            os._exit(self.force_code)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def start_role(role: str, settings: Settings, title: str | None = None) -> None:
    """Process title and logging for ``role`` (called first thing in each main())."""
    setproctitle(f"model-server: {title or role}")
    logs.configure(role, settings.log_level, settings.log_format)
    prepare_run_dir(settings.run_dir)  # 0700 and ours, or RunDirError
