"""Per-model load options are bounded the same way on every way in (models file, /v1, V2)."""

from __future__ import annotations

from typing import Any

import pytest

from model_server.models_file import MAX_BATCH_SIZE, ModelsFileError, model_config_from


def test_valid_options_convert() -> None:
    config = model_config_from(
        {
            "max_batch_size": 64,
            "max_queue_delay_us": 2000.0,
            "preferred_batch_sizes": [32, "8"],
            "max_queue_size": 10,
            "replicas": 2,
            "warmup": False,
        }
    )
    assert config.batching.max_batch_size == 64
    assert config.batching.max_queue_delay_us == 2000
    assert config.batching.preferred_batch_sizes == [8, 32]
    assert (config.batching.max_queue_size, config.replicas, config.warmup) == (10, 2, False)
    assert model_config_from({}) == model_config_from({"max_batch_size": None})


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ({"max_batch_size": 1e20}, "max_batch_size"),
        ({"max_batch_size": MAX_BATCH_SIZE + 1}, "max_batch_size"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_batch_size": 1.5}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_batch_size": "lots"}, "max_batch_size"),
        ({"max_batch_size": "--5"}, "max_batch_size"),
        ({"max_batch_size": [1]}, "max_batch_size"),
        ({"replicas": -1}, "replicas"),
        ({"replicas": 10**6}, "replicas"),
        ({"max_queue_delay_us": -5}, "max_queue_delay_us"),
        ({"max_queue_delay_us": 10**12}, "max_queue_delay_us"),
        ({"max_queue_size": -1}, "max_queue_size"),
        ({"max_queue_size": 2**40}, "max_queue_size"),
        ({"preferred_batch_sizes": [8, -1]}, "preferred_batch_sizes[1]"),
        ({"preferred_batch_sizes": [0]}, "preferred_batch_sizes[0]"),
        ({"preferred_batch_sizes": 8}, "preferred_batch_sizes"),
        ({"preferred_batch_sizes": list(range(1, 100))}, "preferred_batch_sizes"),
        ({"warmup": "no"}, "warmup"),
    ],
)
def test_out_of_bounds_options_are_refused_naming_the_field(item: dict[str, Any], named: str) -> None:
    with pytest.raises(ModelsFileError) as info:
        model_config_from(item)
    assert str(info.value).startswith(f"{named}: ")
    assert len(str(info.value)) < 200  # a huge value is shown shortened


def test_the_name_the_client_used_is_reported() -> None:
    with pytest.raises(ModelsFileError, match=r"^parameters\.config\.max_batch_size: "):
        model_config_from(
            {"max_batch_size": 1e20}, names={"max_batch_size": "parameters.config.max_batch_size"}
        )
