"""bench.json_decode runs, and both paths it times decode every body to the same bytes."""

from __future__ import annotations

import pytest

from bench import json_decode


def test_every_body_decodes_the_same_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    assert json_decode.main(["--rounds", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == list(json_decode.bodies())
    for row in table[2:]:
        assert float(row.split(" | ")[4].rstrip("x")) > 0  # ratio of two measured times
