"""The model-source policy (``loader.policy``) on the real file system, without services.

What travels through the whole stack (403 bodies, logs, the state file, a local
listener that must receive nothing) is in ``tests/integration/test_source_policy.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import loader
from loader import policy
from loader.errors import InvalidUri, SourceNotAllowed
from loader.redact import has_credentials, strip_credentials
from model_server.settings import Settings
from tests import models


def _settings(tmp_path: Path, **fields: object) -> Settings:
    values: dict[str, object] = {
        "model_repository": tmp_path / "repo",
        "cache_dir": tmp_path / "cache",
        "mlflow_tracking_uri": None,
        "aws_s3_bucket": None,
    }
    values.update(fields)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    models.linear(tmp_path / "repo" / "lin" / "1" / "model.onnx", features=3)
    return tmp_path / "repo"


def _refused(uri: str, settings: Settings) -> SourceNotAllowed:
    with pytest.raises(SourceNotAllowed) as info:
        loader.load_artifact("m", "1", uri, settings)
    error = info.value
    assert error.status == 403 and error.code == "source_not_allowed"
    assert "MODEL_SERVER_ALLOWED_LOCAL_ROOTS" in error.message
    return error


def test_repository_paths_load_and_everything_else_is_refused_alike(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    artifact, _ = loader.load_artifact("lin", "1", str(repo / "lin" / "1"), settings)
    assert artifact.path == (repo / "lin" / "1" / "model.onnx").resolve()
    artifact, _ = loader.load_artifact("lin", "1", (repo / "lin" / "1").as_uri(), settings)
    assert artifact.path == (repo / "lin" / "1" / "model.onnx").resolve()
    artifact, _ = loader.load_artifact("lin", "1", None, settings)  # the default rule: the repository

    outside = tmp_path / "outside"
    models.linear(outside / "model.onnx", features=3)
    (repo / "escape").symlink_to(outside)  # a link inside the repository pointing out of it
    (repo / "linkfile" / "1").mkdir(parents=True)  # a real directory whose model.onnx links out
    (repo / "linkfile" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    (repo / "zero" / "1").mkdir(parents=True)  # would never finish hashing if read
    (repo / "zero" / "1" / "only.onnx").symlink_to("/dev/zero")
    (repo / "mlmodel" / "1").mkdir(parents=True)  # an MLmodel that links to a file outside
    (repo / "mlmodel" / "1" / "MLmodel").symlink_to(tmp_path / ".bashrc")
    monkeypatch.chdir(repo / "lin")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".bashrc").write_text("secret")
    uris = [
        "/etc/passwd",
        "/nonexistent/model.onnx",
        "/proc/self/mem",
        "~/.bashrc",
        "../../../outside",
        "file:///etc/passwd",
        "file://elsewhere/repo/lin/1",
        str(repo / "escape"),
        str(repo / "escape" / "model.onnx"),
        str(repo / "linkfile" / "1"),
        str(repo / "zero" / "1"),
        str(repo / "mlmodel" / "1"),
        str(repo / ".." / "outside"),
        str(tmp_path / "cache"),
        "/etc/\x00passwd",
    ]
    messages = {_refused(uri, settings).message for uri in uris}
    # One answer for all: it names neither the path nor whether it exists.
    assert len(messages) == 1
    message = messages.pop()
    assert str(tmp_path) not in message and "passwd" not in message and "exist" not in message


def test_extra_roots_and_the_cache_is_never_a_root(repo: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    model = models.linear(extra / "model.onnx", features=3)
    _refused(str(model), _settings(tmp_path))
    settings = _settings(tmp_path, allowed_local_roots=f"{extra},/nonexistent-root")
    artifact, _ = loader.load_artifact("x", "1", str(model), settings)
    assert artifact.path == model.resolve()
    loader.load_artifact("lin", "1", None, settings)  # the repository stays allowed
    # The cache stays refused even when it lies under an allowed root.
    inside = _settings(tmp_path, allowed_local_roots=str(tmp_path), cache_dir=extra)
    _refused(str(model), inside)
    assert policy.local_roots(_settings(tmp_path)) == [repo.resolve()]


def test_s3_bucket_policy() -> None:
    any_bucket = Settings(aws_s3_bucket=None, allowed_s3_buckets=[])
    policy.admit("s3://anything/x/", any_bucket)
    only_env = Settings(aws_s3_bucket="models", allowed_s3_buckets=[])
    policy.admit("s3://models/fraud/1/", only_env)
    with pytest.raises(SourceNotAllowed) as info:
        policy.admit("s3://other/fraud/1/", only_env)
    assert info.value.status == 403 and "MODEL_SERVER_ALLOWED_S3_BUCKETS" in info.value.message
    listed = Settings(aws_s3_bucket="models", allowed_s3_buckets="a,b")
    policy.admit("s3://b/k", listed)
    with pytest.raises(SourceNotAllowed):
        policy.admit("s3://models/k", listed)
    policy.admit("s3://whatever/k", Settings(aws_s3_bucket="models", allowed_s3_buckets="*"))


def test_mlflow_host_policy() -> None:
    settings = Settings(mlflow_tracking_uri="http://127.0.0.1:5000", allowed_mlflow_hosts=[])
    policy.admit("mlflow-artifacts:/1/model", settings)  # no host: the tracking server
    policy.admit("mlflow-artifacts://127.0.0.1:5000/1/model", settings)
    for foreign in ("mlflow-artifacts://127.0.0.1:5001/x", "mlflow-artifacts://evil.test/x"):
        with pytest.raises(SourceNotAllowed) as info:
            policy.admit(foreign, settings)
        assert "MODEL_SERVER_ALLOWED_MLFLOW_HOSTS" in info.value.message
    with pytest.raises(SourceNotAllowed):
        policy.check_mlflow_host("http://127.0.0.1:5001/api/2.0/mlflow-artifacts/artifacts/x", settings)
    extra = Settings(
        mlflow_tracking_uri="https://mlflow.test", allowed_mlflow_hosts="other.test:8080,plain.test"
    )
    policy.admit("mlflow-artifacts://mlflow.test/x", extra)
    policy.admit("mlflow-artifacts://mlflow.test:443/x", extra)
    policy.admit("mlflow-artifacts://other.test:8080/x", extra)
    policy.admit("mlflow-artifacts://plain.test/x", extra)
    with pytest.raises(SourceNotAllowed):
        policy.admit("mlflow-artifacts://other.test:8081/x", extra)
    # No http(s) tracking server at all: no MLflow host is allowed.
    with pytest.raises(SourceNotAllowed):
        policy.admit("mlflow-artifacts://127.0.0.1:5000/x", Settings(mlflow_tracking_uri="sqlite:///x.db"))


@pytest.mark.parametrize(
    ("uri", "clean"),
    [
        ("s3://AKIA:secret@bucket/m/", "s3://bucket/m/"),
        ("mlflow-artifacts://alice:pw@host:5000/x", "mlflow-artifacts://host:5000/x"),
        ("https://user@host/x?token=abcdef&v=1", "https://host/x?token=***&v=1"),
        ("s3://bucket/m/?X-Amz-Signature=deadbeef", "s3://bucket/m/?X-Amz-Signature=***"),
    ],
)
def test_credentials_in_a_uri_are_refused_and_stripped(uri: str, clean: str) -> None:
    assert has_credentials(uri)
    assert strip_credentials(uri) == clean
    assert strip_credentials(clean) == clean and not has_credentials(clean)
    with pytest.raises(InvalidUri) as info:
        policy.admit(uri, Settings())
    assert info.value.status == 400 and "secret" in info.value.message
    assert "pw" not in info.value.message and "secret@" not in info.value.message


@pytest.mark.parametrize(
    "uri", ["models:/fraud@champion", "models:/fraud/1", "runs:/abc/model", "s3://b/k@v"]
)
def test_ordinary_uris_have_no_credentials(uri: str) -> None:
    assert not has_credentials(uri)


def test_refusal_happens_before_the_file_is_touched(tmp_path: Path, repo: Path) -> None:
    """A FIFO outside the roots would block any reader; the policy answers without opening it."""
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    _refused(str(fifo), _settings(tmp_path))
