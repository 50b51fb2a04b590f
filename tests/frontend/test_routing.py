"""frontend.routing: least busy for unbatched models, fill one worker first for batched ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from frontend.routing import batch_fill, order_workers
from ipc.messages import BatchConfig, ModelConfig, ModelEntry, ModelSchema, TensorSpec
from model_server.settings import get_settings

SCHEMA = ModelSchema(
    inputs=[TensorSpec("x", "FP32", [-1, 3])], outputs=[TensorSpec("y", "FP32", [-1, 2])], batched=True
)


def _entry(max_batch_size: int = 0, batched: bool = True) -> ModelEntry:
    schema = SCHEMA if batched else ModelSchema(inputs=SCHEMA.inputs, outputs=SCHEMA.outputs)
    return ModelEntry(
        "m",
        "1",
        "ready",
        schema=schema,
        workers=[0, 1],
        config=ModelConfig(batching=BatchConfig(max_batch_size=max_batch_size)),
    )


def _burst(workers: list[int], requests: int, fill: int, connected: set[int] | None = None) -> Counter[int]:
    """Route ``requests`` that all stay in flight; how many each worker got."""
    inflight: Counter[int] = Counter()
    up = set(workers) if connected is None else connected
    for rotation in range(requests):
        chosen = order_workers(workers, up.__contains__, inflight.__getitem__, rotation, fill)[0]
        inflight[chosen] += 1
    return inflight


@pytest.fixture
def default_batch_size(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MODEL_SERVER_MAX_BATCH_SIZE", "32")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_unbatched_burst_spreads_evenly() -> None:
    assert _burst([0, 1, 2], 30, fill=0) == {0: 10, 1: 10, 2: 10}


def test_batched_burst_fills_one_worker_before_spreading() -> None:
    assert _burst([0, 1], 32, fill=64) == {0: 32}
    # Past a batch's worth the next worker fills, then the least busy takes the rest.
    assert _burst([0, 1, 2], 20, fill=8) == {0: 8, 1: 8, 2: 4}
    assert _burst([0, 1], 40, fill=8) == {0: 20, 1: 20}


def test_ties_go_to_the_lowest_index_whatever_the_rotation() -> None:
    for rotation in range(4):
        assert order_workers([3, 1, 2], lambda w: True, lambda w: 0, rotation, 16) == [1, 2, 3]


def test_disconnected_workers_go_last_in_both_policies() -> None:
    assert _burst([0, 1], 10, fill=64, connected={1}) == {1: 10}
    assert _burst([0, 1], 10, fill=0, connected={1}) == {1: 10}
    order = order_workers([0, 1], lambda w: w == 1, lambda w: 0, 0, 0)
    assert order == [1, 0]  # still tried: the monitor may be wrong


def test_single_or_no_worker() -> None:
    assert order_workers([5], lambda w: False, lambda w: 3, 0, 16) == [5]
    assert order_workers([], lambda w: True, lambda w: 0, 0, 16) == []


def test_batch_fill_from_the_model_config_and_schema() -> None:
    assert batch_fill(_entry(max_batch_size=16)) == 16
    assert batch_fill(_entry(max_batch_size=1)) == 0  # one row per run: nothing to merge
    assert batch_fill(_entry(max_batch_size=16, batched=False)) == 0  # the worker never merges it
    no_schema = _entry(max_batch_size=16)
    no_schema.schema = None
    assert batch_fill(no_schema) == 0


def test_batch_fill_falls_back_to_the_server_default(default_batch_size: None) -> None:
    assert batch_fill(_entry()) == 32
    assert batch_fill(_entry(max_batch_size=8)) == 8


def test_batch_fill_scales_with_the_setting_and_zero_means_least_busy(
    monkeypatch: pytest.MonkeyPatch, default_batch_size: None
) -> None:
    monkeypatch.setenv("MODEL_SERVER_BATCH_ROUTING_FILL", "0.5")
    get_settings.cache_clear()
    assert batch_fill(_entry()) == 16
    monkeypatch.setenv("MODEL_SERVER_BATCH_ROUTING_FILL", "0")
    get_settings.cache_clear()
    assert batch_fill(_entry()) == 0
    assert _burst([0, 1], 32, fill=batch_fill(_entry())) == {0: 16, 1: 16}
