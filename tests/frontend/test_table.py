"""The frontend's indexes over one table snapshot: a lookup is one dict access, whatever the table holds."""

from __future__ import annotations

from frontend.coordinator_client import Table
from ipc.messages import ModelEntry, ModelState, TableSnapshot


def entry(model_id: str, version: str, state: ModelState) -> ModelEntry:
    return ModelEntry(model_id=model_id, version=version, state=state)


def snapshot(entries: list[ModelEntry]) -> TableSnapshot:
    return TableSnapshot(epoch=1, ready=True, reasons=[], models=entries, workers=[])


def test_latest_is_the_newest_ready_version_and_named_any_version() -> None:
    table = Table(
        snapshot(
            [
                entry("m", "2", "ready"),
                entry("m", "10", "ready"),
                entry("m", "11", "loading"),
                entry("f", "3", "failed"),
                entry("f", "1", "failed"),
            ]
        )
    )
    assert table.latest["m"].version == "10"  # numeric order, ready only
    assert "f" not in table.latest
    assert table.named["f"].version == "1"  # a state to report for a name with nothing ready
    assert table.named["m"].version == "2"
    assert "ghost" not in table.named and "ghost" not in table.latest


def test_indexes_hold_one_entry_per_name() -> None:
    entries = [entry(f"ghost-{i}", "1", "failed") for i in range(300)] + [entry("m", "1", "ready")]
    table = Table(snapshot(entries))
    assert len(table.models) == 301
    assert len(table.named) == 301 and len(table.latest) == 1
