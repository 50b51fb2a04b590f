"""Bounds on one inference request, checked before the work they bound is done.

Each answers 413 in the one error shape, naming the setting: a request over a
server limit is too large, not malformed (the body size limit answers the same).
"""

from __future__ import annotations

from model_server.settings import Settings

from .errors import ApiError


def too_large(message: str, setting: str, limit: int) -> ApiError:
    message = f"{message} exceeds MODEL_SERVER_{setting}={limit}"
    return ApiError(413, "payload_too_large", message, {"limit": limit})


def check_json_size(settings: Settings, size: int) -> None:
    """JSON bodies are parsed whole and take ~20x their size as Python objects."""
    limit = settings.max_json_request_bytes
    if size > limit:
        raise too_large(
            f"JSON inference body of {size} bytes (send large tensors with the binary tensor extension)",
            "MAX_JSON_REQUEST_BYTES",
            limit,
        )


def check_rows(settings: Settings, rows: int, what: str) -> None:
    limit = settings.max_rows_per_request
    if rows > limit:
        raise too_large(f"{what}: {rows} rows", "MAX_ROWS_PER_REQUEST", limit)


def check_inputs(settings: Settings, count: int, what: str) -> None:
    limit = settings.max_inputs_per_request
    if count > limit:
        raise too_large(f"{count} {what}", "MAX_INPUTS_PER_REQUEST", limit)
