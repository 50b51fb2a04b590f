"""Cache reuse, shared downloads, interruptions, access, reachability and secrets, on real services."""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loader
from loader import cache as cache_module
from loader import progress as progress_module
from loader import s3_source
from loader.artifact import Progress
from loader.errors import AccessDenied, LoadError, ModelNotFound, SourceTimeout, SourceUnavailable
from tests.services import blackhole, closed_port_url, run_moto

from .builders import assert_same_outputs
from .conftest import S3_BUCKET, SettingsFactory, World


@pytest.fixture
def s3_gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of every S3 GetObject the loader makes during the test."""
    calls: list[str] = []
    real = s3_source.make_s3_client

    def counting(settings: Any, endpoint_url: str | None = None) -> Any:
        client = real(settings, endpoint_url)
        client.meta.events.register(
            "before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"])
        )
        return client

    monkeypatch.setattr(s3_source, "make_s3_client", counting)
    return calls


def test_second_load_makes_no_download(
    world: World, aws_env: object, make_settings: SettingsFactory, s3_gets: list[str]
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    first, _ = loader.load_artifact("fraud", "1", "models:/fraud/1", settings)
    assert first.downloaded
    assert {Path(k).name for k in s3_gets} == {"MLmodel", "model.onnx"}

    s3_gets.clear()
    events: list[Progress] = []
    second, schema = loader.load_artifact("fraud", "1", "models:/fraud/1", settings, events.append)
    assert not second.downloaded
    assert s3_gets == [], "served from the cache: a LIST, no GET"
    assert events == [], "no download, so the model never enters 'downloading'"
    assert second.path == first.path
    assert schema.feature_names == first.feature_names

    # A restarted coordinator finds the entry on disk.
    cache_module._caches.clear()
    third, _ = loader.load_artifact("fraud", "1", "models:/fraud/1", settings)
    assert not third.downloaded and s3_gets == []
    assert third.path == first.path
    assert_same_outputs(third.path, world.fraud_v1)


def test_changed_object_is_downloaded_again(
    world: World, aws_env: object, make_settings: SettingsFactory, s3_gets: list[str]
) -> None:
    s3 = world.moto.client()
    s3.put_object(Bucket=S3_BUCKET, Key="changing/model.onnx", Body=world.fraud_v1.reference)
    settings = make_settings()
    first, _ = loader.load_artifact("c", "1", f"s3://{S3_BUCKET}/changing/", settings)
    s3.put_object(Bucket=S3_BUCKET, Key="changing/model.onnx", Body=world.fraud_v2.reference)
    s3_gets.clear()
    second, _ = loader.load_artifact("c", "1", f"s3://{S3_BUCKET}/changing/", settings)
    assert second.downloaded and s3_gets == ["changing/model.onnx"]
    assert second.path != first.path
    assert_same_outputs(first.path, world.fraud_v1)
    assert_same_outputs(second.path, world.fraud_v2)


def test_concurrent_loads_share_one_download(
    world: World,
    aws_env: object,
    make_settings: SettingsFactory,
    s3_gets: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    loads = 6
    real_download = s3_source.S3Dir.download

    def held_download(self: s3_source.S3Dir, *args: Any) -> None:
        # Keep the download in flight until every load has joined it.
        cache = cache_module.get_cache(settings.cache_dir, settings.cache_max_bytes)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            flights = list(cache._flights.values())
            if flights and len(flights[0].meter._subscribers) >= loads:
                break
            time.sleep(0.01)
        real_download(self, *args)

    monkeypatch.setattr(s3_source.S3Dir, "download", held_download)
    barrier = threading.Barrier(loads)
    results: list[Any] = [None] * loads
    events: list[list[Progress]] = [[] for _ in range(loads)]

    def load(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = loader.load_artifact("dense", "1", "models:/dense/1", settings, events[i].append)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(loads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results), "every load finished"
    artifacts = [r[0] for r in results]
    assert sum(a.downloaded for a in artifacts) == 1
    assert len({a.path for a in artifacts}) == 1
    assert len(s3_gets) == len(set(s3_gets)) == 3, "MLmodel, model.onnx and its external data, once each"
    assert all(e for e in events), "loads that joined the download saw its progress too"
    assert_same_outputs(artifacts[0].path, world.dense)
    cache = cache_module.get_cache(settings.cache_dir, settings.cache_max_bytes)
    assert cache.usage().pinned_entries == 1
    for artifact in artifacts:
        loader.release(artifact)
    assert cache.usage().pinned_entries == 0
    assert loader.pin(artifacts[0])  # e.g. a model restored from saved state
    assert cache.usage().pinned_entries == 1
    loader.release(artifacts[0])
    assert cache.usage().pinned_entries == 0


class _TruncatingProxy(http.server.ThreadingHTTPServer):
    """Forwards to moto, but cuts every GET of an .onnx object off halfway through its body."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _TruncatingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(self.server.upstream, timeout=10)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in {"transfer-encoding", "connection"}:
                self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        cut = self.command == "GET" and self.path.split("?")[0].endswith(".onnx")
        self.wfile.write(data[: len(data) // 2] if cut else data)
        self.wfile.flush()
        if cut:
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = _forward  # noqa: N815


@pytest.fixture
def truncating_proxy(world: World) -> Iterator[str]:
    proxy = _TruncatingProxy(world.moto.endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


def test_interrupted_download_leaves_nothing_a_later_load_uses(
    world: World,
    aws_env: object,
    make_settings: SettingsFactory,
    truncating_proxy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    monkeypatch.setenv("AWS_ENDPOINT_URL", truncating_proxy)
    with pytest.raises(SourceUnavailable, match="interrupted") as info:
        loader.load_artifact("p", "1", f"s3://{S3_BUCKET}/plain/", settings)
    assert info.value.status == 502
    assert list((settings.cache_dir / "objects").iterdir()) == []
    assert list((settings.cache_dir / "tmp").iterdir()) == []

    monkeypatch.setenv("AWS_ENDPOINT_URL", world.moto.endpoint)
    artifact, _ = loader.load_artifact("p", "1", f"s3://{S3_BUCKET}/plain/", settings)
    assert artifact.downloaded
    assert_same_outputs(artifact.path, world.fraud_v1)


def test_access_denied_is_403_naming_bucket_and_key(
    tmp_path: Path,
    world: World,
    aws_env: object,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="loader")
    with run_moto(tmp_path, name="moto-iam") as moto:
        s3 = moto.client()
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="m/model.onnx", Body=world.fraud_v1.reference)
        iam = moto.client("iam")
        iam.create_user(UserName="reader")  # no policy: may read nothing
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        moto.enforce_auth()
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        for uri, named in (
            ("s3://locked/m/model.onnx", "s3://locked/m/model.onnx"),
            ("s3://locked/m/", "s3://locked/m/"),
        ):
            with pytest.raises(AccessDenied) as info:
                loader.load_artifact("x", "1", uri, make_settings())
            assert info.value.status == 403
            assert named in info.value.message
            assert key["SecretAccessKey"] not in info.value.message
    assert key["SecretAccessKey"] not in caplog.text


def test_unreachable_registry_is_502(make_settings: SettingsFactory) -> None:
    settings = make_settings(mlflow_tracking_uri=closed_port_url(), download_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="unreachable") as info:
        loader.load_artifact("fraud", "1", None, settings)
    assert info.value.status == 502
    assert time.monotonic() - started < 15


def test_registry_that_never_answers_is_504_within_the_timeout(make_settings: SettingsFactory) -> None:
    with blackhole() as url:
        settings = make_settings(mlflow_tracking_uri=url, download_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(SourceTimeout, match=r"within 0\.5 s") as info:
            loader.load_artifact("fraud", "1", "models:/fraud/1", settings)
    assert info.value.status == 504
    assert time.monotonic() - started < 15


def test_unreachable_s3_is_502(
    aws_env: object, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="unreachable") as info:
        loader.load_artifact("p", "1", f"s3://{S3_BUCKET}/plain/", make_settings(download_timeout_s=1.0))
    assert info.value.status == 502
    assert time.monotonic() - started < 20


def test_s3_that_never_answers_is_504(
    aws_env: object, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with blackhole() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        started = time.monotonic()
        with pytest.raises(SourceTimeout) as info:
            loader.load_artifact("p", "1", f"s3://{S3_BUCKET}/plain/", make_settings(download_timeout_s=0.5))
    assert info.value.status == 504
    assert time.monotonic() - started < 20


def test_secrets_never_appear_in_logs_or_errors(
    world: World,
    aws_env: object,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "SECRET-aws-key-3b1f9c2e",
        "AWS_SESSION_TOKEN": "SECRET-aws-token-77aa01",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "SECRET-mlflow-pass-9d4c",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    url_secret = "SECRET-in-url-5e6f"
    caplog.set_level(logging.DEBUG, logger="loader")
    settings = make_settings(mlflow_tracking_uri=world.tracking_uri)
    messages: list[str] = []
    artifact, _ = loader.load_artifact("fraud", "1", "models:/fraud/1", settings)
    assert artifact.downloaded
    loader.load_artifact("p", "1", f"s3://{S3_BUCKET}/plain/", settings)
    for uri, tracking in (
        ("models:/no-such-model/1", world.tracking_uri),
        (f"s3://{S3_BUCKET}/nothing/", world.tracking_uri),
        ("models:/fraud/1", closed_port_url().replace("http://", f"http://bob:{url_secret}@")),
        (f"mlflow-artifacts://x:{url_secret}@127.0.0.1:9/p", world.tracking_uri),
    ):
        with pytest.raises(LoadError) as info:
            loader.load_artifact(
                "e", "1", uri, make_settings(mlflow_tracking_uri=tracking, download_timeout_s=1.0)
            )
        messages.append(str(info.value))
        messages.append(info.value.message)
    assert "unreachable" in messages[4]
    text = caplog.text + "\n".join(messages)
    for secret in [*list(secrets.values())[1:], url_secret]:
        assert secret not in text
    assert "bob:***@" in messages[4] or "***@" in messages[4]


def test_progress_is_logged_for_large_artifacts(
    world: World,
    aws_env: object,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(progress_module, "LOG_MIN_BYTES", 1)  # every artifact counts as large
    monkeypatch.setattr(progress_module, "PROGRESS_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="loader")
    events: list[Progress] = []
    artifact, _ = loader.load_artifact(
        "dense", "1", "models:/dense/1", make_settings(mlflow_tracking_uri=world.tracking_uri), events.append
    )
    assert artifact.downloaded
    assert events[0].done == 0
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].done == events[-1].total == artifact.size
    lines = [r.getMessage() for r in caplog.records if r.name == "loader.progress"]
    assert any("%" in line and "/s" in line and "of" in line for line in lines), lines
    assert any(line.startswith("downloaded ") for line in lines), lines


def test_missing_run_artifact_message(world: World, aws_env: object, make_settings: SettingsFactory) -> None:
    with pytest.raises(ModelNotFound, match="no-such-path"):
        loader.load_artifact(
            "r",
            "1",
            f"runs:/{world.raw_run}/no-such-path",
            make_settings(mlflow_tracking_uri=world.tracking_uri),
        )
