"""Start-up models file and per-model options, shared by the coordinator and the frontends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ipc.messages import BatchConfig, ModelConfig


class ModelsFileError(ValueError):
    """The models file or a model option cannot be read."""


# Bounds of the per-model options, the same on every way in (models file, /v1 and V2 loads):
# a value past them is a client's mistake (or an attack: 1e20 overflowed msgpack, a negative
# replica count left the load waiting for a worker that is never asked), answered 4xx naming it.
MAX_BATCH_SIZE = 65536
MAX_QUEUE_DELAY_US = 60_000_000  # one minute; the request deadline is shorter anyway
MAX_QUEUE_SIZE = 1 << 20
MAX_PREFERRED_BATCH_SIZES = 32
MAX_REPLICAS = 256  # MODEL_SERVER_WORKERS' own upper bound
MAX_URI_LENGTH = 4096

_BOUNDS: dict[str, tuple[int, int]] = {
    "max_batch_size": (0, MAX_BATCH_SIZE),
    "max_queue_delay_us": (0, MAX_QUEUE_DELAY_US),
    "max_queue_size": (0, MAX_QUEUE_SIZE),
    "replicas": (0, MAX_REPLICAS),
}


_INTEGER = re.compile(r"-?[0-9]{1,18}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bounded_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer option in [low, high]; numeric strings and integral floats count, booleans do not."""
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and _INTEGER.fullmatch(value.strip()) is not None
    ):
        number = int(value)
    if number is None or not low <= number <= high:
        raise ModelsFileError(f"{name}: must be an integer from {low} to {high}, got {_shown(value)}")
    return number


def model_config_from(
    item: dict[str, Any], startup: bool = False, names: dict[str, str] | None = None
) -> ModelConfig:
    """Batching and placement options as given on load (models file, /v1 or /v2 load).

    ``names`` maps an option to the name the client used for it (a Triton config field), so
    an error names what the client sent.
    """
    names = names or {}
    values: dict[str, int] = {}
    for option, (low, high) in _BOUNDS.items():
        raw = item.get(option)
        values[option] = 0 if raw is None else _bounded_int(names.get(option, option), raw, low, high)
    preferred = item.get("preferred_batch_sizes")
    name = names.get("preferred_batch_sizes", "preferred_batch_sizes")
    if preferred is None:
        preferred = []
    if not isinstance(preferred, list) or len(preferred) > MAX_PREFERRED_BATCH_SIZES:
        raise ModelsFileError(
            f"{name}: must be a list of at most {MAX_PREFERRED_BATCH_SIZES} batch sizes, "
            f"got {_shown(preferred)}"
        )
    sizes = sorted(_bounded_int(f"{name}[{i}]", x, 1, MAX_BATCH_SIZE) for i, x in enumerate(preferred))
    warmup = item.get("warmup", True)
    if not isinstance(warmup, bool):
        raise ModelsFileError(f"{names.get('warmup', 'warmup')}: must be true or false, got {_shown(warmup)}")
    return ModelConfig(
        batching=BatchConfig(
            max_batch_size=values["max_batch_size"],
            max_queue_delay_us=values["max_queue_delay_us"],
            preferred_batch_sizes=sizes,
            max_queue_size=values["max_queue_size"],
        ),
        replicas=values["replicas"],
        warmup=warmup,
        startup=startup,
    )


def read_models_file(path: Path) -> list[tuple[str, str, str | None, ModelConfig]]:
    """The start-up models (YAML or JSON): a list, or ``{"models": [...]}``.

    Each item: ``model_id``, ``version`` (default "1"), ``registry_uri``,
    ``max_batch_size``, ``max_queue_delay_us``, ``preferred_batch_sizes``,
    ``max_queue_size``, ``replicas``, ``warmup`` (default true).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"cannot read models file {path}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("models", [])
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ModelsFileError(f"models file {path} must hold a list of models")
    out: list[tuple[str, str, str | None, ModelConfig]] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "model_id" not in item:
            raise ModelsFileError(f"models file {path}: entry {i} needs at least model_id")
        uri = item.get("registry_uri")
        out.append(
            (
                str(item["model_id"]),
                str(item.get("version", "1")),
                str(uri) if uri else None,
                model_config_from(item, startup=True),
            )
        )
    return out
