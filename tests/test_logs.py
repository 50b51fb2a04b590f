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


FORGED = "/v1/x\r\n2026-12-03 05:00:00,000 INFO [frontend:1] [-] model_server.access: GET /admin 200"


def _emit_forged(fmt: str) -> str:
    stream = io.StringIO()
    logs.configure("frontend", "INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    token = logs.request_id_var.set("id\nforged")
    try:
        logging.getLogger("model_server.access").info("%s %s %d", "GET", FORGED, 404)
        try:
            raise ValueError(f"bad path {FORGED}")
        except ValueError:
            logging.getLogger("frontend.errors").exception("unhandled error on %s", "/p\x85\u2028\u202e")
    finally:
        logs.request_id_var.reset(token)
    return stream.getvalue()


def test_text_lines_cannot_be_forged(captured: logging.Logger) -> None:
    out = _emit_forged("text")
    lines = out.splitlines()
    records = [line for line in lines if not line.startswith(" ")]
    # Two records, each starting a line; the traceback's lines are indented continuations.
    assert len(records) == 2, out
    assert "GET /v1/x\\r\\n2026-12-03 05:00:00,000 INFO" in records[0]
    assert "[id\\nforged]" in records[0]
    assert records[1].endswith("unhandled error on /p\\x85\\u2028\\u202e")
    assert any("ValueError: bad path /v1/x\\r" in line for line in lines)
    assert "\r" not in out
    assert all(line.isprintable() for line in lines)


def test_json_lines_cannot_be_forged(captured: logging.Logger) -> None:
    out = _emit_forged("json")
    lines = out.splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert first["message"] == f"GET {FORGED} 404"
    assert first["request_id"] == "id\nforged"
    assert "bad path" in second["exc"]
    assert second["message"] == "unhandled error on /p\x85\u2028\u202e"
    assert all(line.isprintable() for line in lines)
    # Outside the BMP, a non-printable becomes a surrogate pair and reads back the same.
    handler = captured.handlers[0]
    assert isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, io.StringIO)
    logging.getLogger("x").info("tag %s", "\U000e0001")
    assert orjson.loads(handler.stream.getvalue().splitlines()[-1])["message"] == "tag \U000e0001"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain /v1/models/a 200", "plain /v1/models/a 200"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\tnul\x00del\x7f", "tab\\tnul\\x00del\\x7f"),
        ("nel\x85 ls\u2028 rlo\u202e", "nel\\x85 ls\\u2028 rlo\\u202e"),
        ("unicode é ✓ stays", "unicode é ✓ stays"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert logs.escape(raw) == shown
