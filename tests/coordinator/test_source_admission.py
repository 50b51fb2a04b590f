"""The coordinator's entry point applies the model-source policy before a URI is stored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ipc.messages import ClientLoad, ModelConfig

from .test_core import CLIENT, KEY, SCHEMA, World, replies


def _load(world: World, uri: str) -> None:
    world.core.handle_client(CLIENT, ClientLoad(1, KEY[0], KEY[1], uri, ModelConfig()))


@pytest.mark.parametrize(
    ("uri", "status", "code"),
    [
        ("/etc/passwd", 403, "source_not_allowed"),
        ("s3://AKIAUSER:s3cretpassw0rd@bucket/m/", 400, "invalid_uri"),
        ("mlflow-artifacts://127.0.0.1:9/x", 403, "source_not_allowed"),
    ],
)
def test_refused_sources_never_enter_the_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, uri: str, status: int, code: str
) -> None:
    world = World(tmp_path)
    caplog.set_level(logging.INFO)
    _load(world, uri)
    ((peer, reply),) = replies(world.take())
    assert (peer, reply.status, reply.code) == (CLIENT, status, code)
    assert "/etc/passwd" not in reply.error and "s3cretpassw0rd" not in reply.error
    assert world.core.models == {} and world.core.fetches == []
    assert "s3cretpassw0rd" not in caplog.text


def test_uris_are_stored_and_persisted_without_credentials(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.load()
    # Even a source that reports its location with credentials cannot put them in the table.
    world.core.on_fetched(KEY, "/cache/m.onnx", "ab" * 32, 1, SCHEMA, "https://bob:pw12345678@h/x?token=abc")
    assert world.core.models[KEY].registry_uri == "https://h/x?token=***"
    (saved,) = world.core.desired_models()
    assert saved["registry_uri"] == "https://h/x?token=***"
