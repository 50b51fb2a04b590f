"""MLflow requests go only to configured hosts, and MLflow's errors are classified by type.

A real MLflow tracking server (``tests.services``) holds model versions whose
artifacts it says are on another host; plain HTTP servers on 127.0.0.1 stand
for a foreign host (counting connections) and for registries that answer 401,
403 or a non-MLflow 404.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import loader
from loader.errors import AccessDenied, ModelNotFound, SourceNotAllowed, SourceUnavailable

from .conftest import SettingsFactory, World

TOKEN = "token-for-the-configured-server-only"
JSON = "application/json"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        status, body, kind = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, answer: tuple[int, bytes, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def http_server() -> Iterator[_Server]:
    """A plain HTTP server on 127.0.0.1; tests set ``.answer`` (status, body, content type)."""
    srv = _Server((200, b"{}", "application/json"))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_registry_pointing_at_a_foreign_host_gets_no_request(
    make_settings: SettingsFactory, http_server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry (here sqlite: an MLflow server refuses such sources itself) naming another host."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sources = {
        "proxied": f"mlflow-artifacts://127.0.0.1:{http_server.server_address[1]}/internal/admin",
        "http": f"{http_server.url}/api/2.0/mlflow-artifacts/artifacts/internal/admin",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for name, source in sources.items():
            client.create_registered_model(name)
            client.create_model_version(name, source)
    settings = make_settings(mlflow_tracking_uri=uri)
    for name in sources:
        with pytest.raises(SourceNotAllowed) as info:
            loader.load_artifact(name, "1", f"models:/{name}/1", settings)
        assert info.value.status == 403 and "MODEL_SERVER_ALLOWED_MLFLOW_HOSTS" in info.value.message
    assert http_server.requests == []


def test_mlflow_credentials_go_only_to_configured_hosts(
    world: World, make_settings: SettingsFactory, http_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    foreign = f"mlflow-artifacts://127.0.0.1:{http_server.server_address[1]}/internal/admin"
    with pytest.raises(SourceNotAllowed):
        loader.load_artifact("x", "1", foreign, make_settings(mlflow_tracking_uri=world.tracking_uri))
    assert http_server.requests == []
    # Listed in MODEL_SERVER_ALLOWED_MLFLOW_HOSTS, the host is configured: asked, with the token.
    allowed = make_settings(
        mlflow_tracking_uri=world.tracking_uri,
        allowed_mlflow_hosts=f"127.0.0.1:{http_server.server_address[1]}",
    )
    with pytest.raises(ModelNotFound):  # it lists nothing
        loader.load_artifact("x", "1", foreign, allowed)
    assert http_server.requests
    assert all(auth == f"Bearer {TOKEN}" for _, auth in http_server.requests)


@pytest.mark.parametrize(
    ("answer", "error", "status"),
    [
        ((401, b"You are not authenticated.", "text/plain"), AccessDenied, 403),
        ((403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', JSON), AccessDenied, 403),
        ((404, b"<html>not here</html>", "text/html"), SourceUnavailable, 502),
        ((500, b"boom", "text/plain"), SourceUnavailable, 502),
        ((404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"}', JSON), ModelNotFound, 404),
    ],
)  # fmt: skip
def test_registry_answers_are_classified_by_type(
    make_settings: SettingsFactory,
    http_server: _Server,
    answer: tuple[int, bytes, str],
    error: type[Exception],
    status: int,
) -> None:
    http_server.answer = answer
    settings = make_settings(mlflow_tracking_uri=http_server.url, mlflow_max_retries=0)
    with pytest.raises(error) as info:
        loader.load_artifact("fraud", "1", "models:/fraud/1", settings)
    assert getattr(info.value, "status", 0) == status
    assert http_server.requests, "the configured registry was asked"
