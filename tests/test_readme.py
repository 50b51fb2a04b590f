"""The README tells the truth about settings and commands."""

from __future__ import annotations

from pathlib import Path

from model_server.cli import settings_table
from model_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_settings_table_is_generated_from_the_settings_class() -> None:
    assert settings_table() in README, "regenerate with `model-server settings` and paste into README.md"
    for name in Settings.model_fields:
        assert name.upper() in README


def test_the_two_commands_are_documented_and_ci_calls_make_test() -> None:
    assert "make serve" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "\nserve:" in makefile and "\ntest:" in makefile
