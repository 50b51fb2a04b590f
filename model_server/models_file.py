"""Start-up models file and per-model options, shared by the coordinator and the frontends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ipc.messages import BatchConfig, ModelConfig


class ModelsFileError(ValueError):
    """The models file or a model option cannot be read."""


def model_config_from(item: dict[str, Any], startup: bool = False) -> ModelConfig:
    """Batching and placement options as given on load (models file, /v1 or /v2 load)."""
    try:
        return ModelConfig(
            batching=BatchConfig(
                max_batch_size=int(item.get("max_batch_size") or 0),
                max_queue_delay_us=int(item.get("max_queue_delay_us") or 0),
                preferred_batch_sizes=sorted(int(x) for x in item.get("preferred_batch_sizes") or []),
                max_queue_size=int(item.get("max_queue_size") or 0),
            ),
            replicas=int(item.get("replicas") or 0),
            warmup=bool(item.get("warmup", True)),
            startup=startup,
        )
    except (TypeError, ValueError) as exc:
        raise ModelsFileError(f"bad model option: {exc}") from None


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
