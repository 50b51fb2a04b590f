"""supervisord.conf stays in step with model_server.exitcodes and model_server.cli.supervisor_env."""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from model_server import exitcodes
from model_server.cli import supervisor_env, supervisord_conf
from model_server.settings import Settings

CONF = supervisord_conf()
ENV_REF = re.compile(r"%\(ENV_([A-Za-z0-9_]+)\)s")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith("MODEL_SERVER_"):
            monkeypatch.delenv(key)
    yield monkeypatch


def _parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONF)
    return parser


def test_conf_is_the_repository_file() -> None:
    assert Path(__file__).resolve().parent.parent / "supervisord.conf" == CONF


def test_every_program_lists_the_expected_exit_codes() -> None:
    parser = _parser()
    programs = [s for s in parser.sections() if s.startswith("program:")]
    assert sorted(programs) == [
        "program:coordinator",
        "program:frontend",
        "program:spare-worker",
        "program:worker",
    ]
    for section in programs:
        codes = tuple(int(c) for c in parser.get(section, "exitcodes").split(","))
        assert codes == exitcodes.EXPECTED, section
        assert parser.get(section, "autorestart") == "unexpected", section


def test_every_expanded_variable_is_set_by_supervisor_env(clean_env: pytest.MonkeyPatch) -> None:
    text = CONF.read_text()
    referenced = set(ENV_REF.findall(text))
    assert {"MODEL_SERVER_RUN_DIR", "MODEL_SERVER_WORKERS", "MODEL_SERVER_BIN"} <= referenced
    env = supervisor_env(Settings())
    missing = sorted(name for name in referenced if name not in env)
    assert missing == []
    # And the expansion itself leaves nothing unexpanded but supervisord's own process_num.
    expanded = ENV_REF.sub(lambda m: env[m.group(1)], text)
    assert re.findall(r"%\((\w+)\)", expanded) == ["process_num"] * expanded.count("%(process_num)")


def test_supervisord_parses_the_conf_with_our_environment(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings(run_dir=tmp_path, workers=3, spare_workers=2, frontend_processes=2, drain_seconds=20)
    env = supervisor_env(settings)
    assert env["MODEL_SERVER_STOPWAIT"] == "30"  # longer than the drain
    options = ServerOptions()
    options.environ_expansions = {f"ENV_{k}": v for k, v in env.items()}
    options.here = str(CONF.parent)
    section = options.read_config(str(CONF))
    assert section.pidfile == str(tmp_path / "supervisord.pid")
    groups = {g.name: g for g in section.process_group_configs}
    assert set(groups) == {"coordinator", "worker", "spare-worker", "frontend"}
    workers = groups["worker"].process_configs
    spares = groups["spare-worker"].process_configs
    assert [p.name for p in workers] == ["worker-0", "worker-1", "worker-2"]
    assert [p.name for p in spares] == ["worker-3", "worker-4"]
    assert [p.environment["MODEL_SERVER_WORKER_INDEX"] for p in workers + spares] == ["0", "1", "2", "3", "4"]
    assert all(p.autostart for p in workers) and not any(p.autostart for p in spares)
    assert len(groups["frontend"].process_configs) == 2
    for group in groups.values():
        for proc in group.process_configs:
            assert tuple(proc.exitcodes) == exitcodes.EXPECTED
            assert proc.command.startswith(env["MODEL_SERVER_BIN"])
            assert proc.command.split()[-1] in {"coordinator", "worker", "frontend"}
    stopwait = {g: {p.stopwaitsecs for p in groups[g].process_configs} for g in groups}
    assert stopwait["worker"] == stopwait["frontend"] == {30}
    # Stop order: frontends drain first, the coordinator (which sweeps shared memory) last.
    assert groups["frontend"].priority > groups["worker"].priority > groups["coordinator"].priority
