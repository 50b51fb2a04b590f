"""Names that become paths and URL parts: model ids and versions."""

from __future__ import annotations

import re
from typing import Any

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class InvalidName(ValueError):
    pass


def check_part(kind: str, value: str) -> str:
    """model_id / version: no separators, no '..', at most 128 characters."""
    if not _SAFE_PART.match(value) or ".." in value:
        raise InvalidName(
            f"{kind} {value!r} must be 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def version_key(version: str) -> tuple[Any, ...]:
    """Newest version first by number when versions are numeric, else by text."""
    parts: list[tuple[int, Any]] = []
    for part in version.replace("-", ".").split("."):
        parts.append((1, int(part)) if part.isdigit() else (0, part))
    return tuple(parts)
