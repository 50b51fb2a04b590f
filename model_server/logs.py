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


def _escape_table() -> dict[int, str]:
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    table.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
    return table


_ESCAPES = _escape_table()


def escape(text: str) -> str:
    """``text`` on one line: C0/C1 controls as ``\\n``, ``\\r``, ``\\t``, ``\\xNN``; other
    non-printables (line/paragraph separators, bidi overrides) as ``\\uNNNN``.

    Printable text, nearly every line, costs one C-level ``isprintable`` check.
    """
    if text.isprintable():
        return text
    text = text.translate(_ESCAPES)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


class TextFormatter(logging.Formatter):
    """The text format, one record per line whatever a request put into it.

    Request data (paths, ids, model ids, URIs) reaches log lines as message arguments
    and context fields; escaping it here, centrally, means no call site can forget.
    A traceback keeps its lines, but each continuation line is indented, so no line
    written by an exception's message can pass for a log record of its own.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging.Formatter API
        values = dict(record.__dict__)
        for key in ("message", "request_id", "model", "name", "role"):
            value = values.get(key)
            if isinstance(value, str):
                values[key] = escape(value)
        return TEXT_FORMAT % values

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if "\n" in line or not line.isprintable():
            # Only the traceback part can still hold a newline (the message is escaped).
            line = "\n    ".join(escape(part) for part in line.split("\n"))
        return line


def _json_char(c: str) -> str:
    if c.isprintable():
        return c
    code = ord(c)
    if code > 0xFFFF:  # a JSON escape is UTF-16: a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; orjson escapes every control character."""

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
        text = orjson.dumps(entry).decode()
        # orjson escapes C0 controls but, as JSON allows, writes U+0085, U+2028 and the like raw;
        # some log readers break lines there, so they are escaped too (only inside strings).
        return text if text.isprintable() else "".join(map(_json_char, text))


def configure(role: str, level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger for this process's role."""
    global _role
    _role = role
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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
