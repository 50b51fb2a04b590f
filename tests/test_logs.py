"""Log lines carry role, pid, request id and model, as text or JSON lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from model_server import logs


@pytest.fixture
def captured() -> Iterator[logging.Logger]:
    """Restores the root logger that ``logs.configure`` replaces."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers = handlers
    root.setLevel(level)


def _emit(fmt: str, stream: io.StringIO) -> str:
    logs.configure("worker-3", "INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    token = logs.request_id_var.set("req-77")
    model = logs.model_var.set("fraud:2")
    try:
        logging.getLogger("workers.serving").info("ran %s rows", 3)
    finally:
        logs.request_id_var.reset(token)
        logs.model_var.reset(model)
    return stream.getvalue()


def test_text_lines_have_role_pid_and_request_id(captured: logging.Logger) -> None:
    line = _emit("text", io.StringIO())
    assert "[worker-3:" in line and "[req-77]" in line and "ran 3 rows" in line


def test_json_lines(captured: logging.Logger) -> None:
    entry = orjson.loads(_emit("json", io.StringIO()).strip())
    assert entry["role"] == "worker-3"
    assert entry["request_id"] == "req-77"
    assert entry["model"] == "fraud:2"
    assert entry["message"] == "ran 3 rows"
    assert entry["level"] == "INFO" and isinstance(entry["pid"], int)


def test_noisy_libraries_never_log_below_info(captured: logging.Logger) -> None:
    logs.configure("coordinator", "DEBUG", "text")
    assert logging.getLogger("botocore").getEffectiveLevel() >= logging.INFO
    assert logging.getLogger("urllib3").getEffectiveLevel() >= logging.INFO
