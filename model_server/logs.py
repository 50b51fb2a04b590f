"""Logging set-up shared by every role: role, pid and request id on every line.

The request id travels in a context variable: the frontend's middleware sets it
from ``X-Request-ID``; the worker sets it from the ``trace_id`` of the message it
is serving, so one id follows a request across processes.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
model_var: contextvars.ContextVar[str] = contextvars.ContextVar("model", default="-")

_role = "main"

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(role)s:%(process)d] [%(request_id)s] %(name)s: %(message)s"


class ContextFilter(logging.Filter):
    """Stamps role, request id and model on each record (a filter, so third-party loggers get them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "model"):
            record.model = model_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "model": getattr(record, "model", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(role: str, level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger for this process's role."""
    global _role
    _role = role
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn configures its own loggers; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware writes the access line
    # botocore and urllib3 print request headers (session tokens) at DEBUG: never below INFO.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.INFO))
