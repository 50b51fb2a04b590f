"""Unit tests of model_server.settings (and the exit codes that supervisord.conf mirrors)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from model_server import exitcodes
from model_server.cli import settings_table
from model_server.settings import Settings, get_settings

OWN_PREFIXES = ("MODEL_SERVER_",)
ALIASES = ("MLFLOW_TRACKING_URI", "AWS_S3_BUCKET")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No server variable from the surrounding shell leaks into the test."""
    for key in list(os.environ):
        if key.startswith(OWN_PREFIXES) or key in ALIASES:
            monkeypatch.delenv(key)
    yield monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.host, s.port, s.workers, s.log_level) == ("0.0.0.0", 8001, 4, "INFO")
    assert s.mlflow_tracking_uri is None and s.aws_s3_bucket is None
    assert s.max_batch_size == 0  # dynamic batching off unless asked
    assert s.max_queue_size >= 1
    assert s.heartbeat_timeout_s > s.heartbeat_interval_s
    assert s.shm_arena_bytes == 128 * 1024 * 1024
    assert s.cors_origins == []
    assert s.allow_client_shm is False


def test_environment_overrides(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MODEL_SERVER_WORKERS", "3")
    clean_env.setenv("MODEL_SERVER_PORT", "9000")
    clean_env.setenv("MODEL_SERVER_LOG_LEVEL", "debug")
    clean_env.setenv("MODEL_SERVER_CORS_ORIGINS", "http://a.test, http://b.test ,")
    clean_env.setenv("MODEL_SERVER_REQUEST_TIMEOUT_S", "2.5")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.test:5000")
    clean_env.setenv("AWS_S3_BUCKET", "models")
    s = Settings()
    assert (s.workers, s.port, s.log_level) == (3, 9000, "DEBUG")
    assert s.cors_origins == ["http://a.test", "http://b.test"]
    assert s.request_timeout_s == 2.5
    assert s.mlflow_tracking_uri == "http://mlflow.test:5000"
    assert s.aws_s3_bucket == "models"


def test_prefixed_alias_also_works(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MODEL_SERVER_AWS_S3_BUCKET", "other")
    assert Settings().aws_s3_bucket == "other"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODEL_SERVER_WORKERS", "0"),
        ("MODEL_SERVER_PORT", "70000"),
        ("MODEL_SERVER_LOG_LEVEL", "LOUD"),
        ("MODEL_SERVER_SHM_ARENA_BYTES", "1000"),
        ("MODEL_SERVER_REQUEST_TIMEOUT_S", "0"),
        ("MODEL_SERVER_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_values_are_refused(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    field = name.removeprefix("MODEL_SERVER_").lower()
    assert field in str(info.value)


def test_gpu_ids(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings(gpus="auto").gpu_ids(2) == [0, 1]
    assert Settings(gpus="auto").gpu_ids(0) == []
    for off in ("none", "cpu", "off", "", " NONE "):
        assert Settings(gpus=off).gpu_ids(4) == []
    assert Settings(gpus="1,3").gpu_ids(0) == [1, 3]
    with pytest.raises(ValueError):
        Settings(gpus="first").gpu_ids(1)


def test_instance_name_and_shm_prefix(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a = Settings(run_dir=tmp_path / "a")
    b = Settings(run_dir=tmp_path / "b")
    assert re.fullmatch(r"[0-9a-f]{8}", a.instance_name)
    assert a.instance_name == Settings(run_dir=tmp_path / "a").instance_name  # stable
    assert a.instance_name != b.instance_name  # two servers on one host stay apart
    assert a.shm_prefix == f"msrv_{a.instance_name}_"
    named = Settings(run_dir=tmp_path / "a", instance="blue")
    assert (named.instance_name, named.shm_prefix) == ("blue", "msrv_blue_")


def test_get_settings_reads_once(clean_env: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        first = get_settings()
        clean_env.setenv("MODEL_SERVER_WORKERS", "7")
        assert get_settings() is first
        assert first.workers == 4
    finally:
        get_settings.cache_clear()


def test_every_setting_is_documented() -> None:
    table = settings_table().splitlines()
    assert table[0] == "| Variable | Default | Meaning |"
    assert len(table) == 2 + len(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
    assert any(row.startswith("| `MLFLOW_TRACKING_URI` |") for row in table)
    assert any(row.startswith("| `MODEL_SERVER_WORKERS` | `4` |") for row in table)


def test_exit_codes() -> None:
    assert exitcodes.EXPECTED == (exitcodes.OK, exitcodes.BOOT_ERROR)
    codes = [exitcodes.OK, exitcodes.BOOT_ERROR, exitcodes.RECYCLE]
    assert len(set(codes)) == len(codes)
    # A recycling worker must be restarted: never "expected".
    assert exitcodes.RECYCLE not in exitcodes.EXPECTED
