"""Models in S3 or an S3-compatible store: ``s3://bucket/prefix/`` and ``s3://bucket/key.onnx``.

* ``s3://bucket/key`` (no trailing slash) that names an object: that object is
  the ONNX file;
* ``s3://bucket/prefix/`` (or a key with no object, read as a prefix): the
  objects directly under it, holding ``model.onnx`` or an MLflow model
  directory (``MLmodel`` with the onnx flavor), plus any external-data files.

boto3 finds credentials, region and endpoint itself: the standard ``AWS_*``
variables, profiles and roles, and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
for S3-compatible stores (MinIO, Ceph, moto). For artifacts an MLflow registry
points at, ``MLFLOW_S3_ENDPOINT_URL`` wins over them, as in MLflow itself (a
MinIO setup often sets only that one).
Every request has ``download_timeout_s`` as connect and read timeout and at most
``S3_MAX_ATTEMPTS`` attempts.

The cache key comes from a HEAD (one object) or a LIST (a prefix): ETags,
version ids and sizes, so a second load of unchanged content makes no GET. The
GET carries ``If-Match`` with the listed ETag, so the bytes cached are the bytes
the key names.

Errors: 403 -> AccessDenied naming bucket and key; missing bucket or key -> 404;
endpoint unreachable -> 502; no answer within the timeout -> 504.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_server.settings import Settings

from .artifact import Artifact, ProgressCallback
from .errors import (
    AccessDenied,
    InvalidUri,
    LoadError,
    ModelNotFound,
    SourceTimeout,
    SourceUnavailable,
)
from .progress import DownloadMeter
from .redact import redact, register_secret
from .remote import CHUNK_BYTES, RemoteFile, Target, fetch_target, local_io_error
from .resolve import register_source

log = logging.getLogger(__name__)

S3_MAX_ATTEMPTS = 3  # botocore "standard" retry mode: attempts including the first
MAX_LIST_PAGES = 10  # 10,000 objects directly under one model prefix is plenty

_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "Forbidden",
        "403",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    if not uri.lower().startswith("s3://"):
        raise InvalidUri(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidUri(
            f"s3 URI {uri!r} names no bucket; expected s3://bucket/prefix/ or s3://bucket/key.onnx"
        )
    return bucket, key


_loader_lock = threading.Lock()
_data_loader: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (credentials and endpoint read anew) sharing one data loader.

    Parsing botocore's endpoint and service JSON costs most of a second; the
    loader caches it, so clients after the first take milliseconds.
    """
    import botocore.loaders
    import botocore.session

    global _data_loader
    with _loader_lock:
        if _data_loader is None:
            _data_loader = botocore.loaders.create_loader()
        session = botocore.session.Session()
        session.register_component("data_loader", _data_loader)
    return session


def make_s3_client(settings: Settings, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client with bounded timeouts and retries.

    Credentials, and the endpoint unless ``endpoint_url`` is given, as boto3 finds them.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(botocore_session=_botocore_session())
    config = Config(
        connect_timeout=settings.download_timeout_s,
        read_timeout=settings.download_timeout_s,
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
    )
    client = session.client("s3", config=config, endpoint_url=endpoint_url or None)
    try:
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            register_secret(frozen.secret_key)
            register_secret(frozen.token)
    except Exception:  # a broken profile: the first request reports it
        log.debug("could not read AWS credentials for redaction", exc_info=True)
    return client


def _endpoint(client: Any) -> str:
    return redact(str(getattr(client.meta, "endpoint_url", "") or "the S3 endpoint"))


def s3_error(exc: BaseException, client: Any, bucket: str, key: str, timeout_s: float) -> LoadError:
    """Map a botocore exception to the LoadError a user can act on."""
    from botocore import exceptions as bce

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, LoadError):
        return exc
    local = local_io_error(exc, where)
    if local is not None:
        return local
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        make = next((m for matches, m in _CLIENT_ERRORS if matches(status, code)), _answered)
        return make(where, bucket, code or str(status))
    return _transport_error(exc, where, client, timeout_s)


def _answered(where: str, bucket: str, what: str) -> LoadError:
    return SourceUnavailable(f"S3 answered {what} for {where}")


# (HTTP status, S3 error code) -> does this row apply; (where, bucket, code or status) -> the error.
_CLIENT_ERRORS: tuple[tuple[Callable[[int, str], bool], Callable[[str, str, str], LoadError]], ...] = (
    (
        lambda status, code: status in {401, 403} or code in _ACCESS_CODES,
        lambda where, bucket, what: AccessDenied(
            f"access denied to {where} ({what}); check that the credentials may read it"
        ),
    ),
    (
        lambda status, code: code == "NoSuchBucket",
        lambda where, bucket, what: ModelNotFound(f"S3 bucket {bucket!r} does not exist ({where})"),
    ),
    (
        lambda status, code: status == 404 or code in _MISSING_CODES,
        lambda where, bucket, what: ModelNotFound(f"{where} does not exist"),
    ),
    (
        lambda status, code: status == 412 or code == "PreconditionFailed",
        lambda where, bucket, what: SourceUnavailable(
            f"{where} changed while it was being downloaded; load it again"
        ),
    ),
)


def _transport_error(exc: BaseException, where: str, client: Any, timeout_s: float) -> LoadError:
    """Credentials, timeouts and connections: the first matching row (subclasses before bases)."""
    from botocore import exceptions as bce

    rows: list[tuple[tuple[type[BaseException], ...], Callable[[], LoadError]]] = [
        (
            (bce.NoCredentialsError, bce.PartialCredentialsError),
            lambda: AccessDenied(
                f"no usable AWS credentials to read {where} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile or a role)"
            ),
        ),
        (
            (bce.ConnectTimeoutError, bce.ReadTimeoutError, TimeoutError),
            lambda: SourceTimeout(
                f"S3 endpoint {_endpoint(client)} did not answer within {timeout_s:g} s ({where})"
            ),
        ),
        (
            (bce.EndpointConnectionError,),
            lambda: SourceUnavailable(f"S3 endpoint {_endpoint(client)} is unreachable ({where})"),
        ),
        (
            (bce.BotoCoreError, OSError),
            lambda: SourceUnavailable(
                f"reading {where} from {_endpoint(client)} failed: {type(exc).__name__}"
            ),
        ),
    ]
    make = next((m for types, m in rows if isinstance(exc, types)), None)
    return make() if make else SourceUnavailable(f"reading {where} failed: {type(exc).__name__}")


class S3Dir:
    """The objects directly under one prefix."""

    def __init__(self, client: Any, bucket: str, prefix: str, timeout_s: float) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.timeout_s = timeout_s
        self._etags: dict[str, tuple[str, str]] = {}  # name -> (ETag, VersionId)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _error(self, exc: BaseException, key: str) -> LoadError:
        return s3_error(exc, self.client, self.bucket, key, self.timeout_s)

    def _file(self, name: str, size: int, etag: str, version_id: str) -> RemoteFile:
        self._etags[name] = (etag, version_id)
        return RemoteFile(name=name, size=size, version=f"{etag}{'@' + version_id if version_id else ''}")

    def list_files(self) -> dict[str, RemoteFile]:
        files: dict[str, RemoteFile] = {}
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "Delimiter": "/"}
        try:
            for _ in range(MAX_LIST_PAGES):
                page = self.client.list_objects_v2(**kwargs)
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.prefix) :]
                    if name:  # "prefix/" itself may exist as a folder marker
                        files[name] = self._file(name, int(obj["Size"]), str(obj.get("ETag", "")), "")
                if not page.get("IsTruncated"):
                    break
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
        except Exception as exc:
            raise self._error(exc, self.prefix) from None
        return files

    def head(self, name: str) -> RemoteFile | None:
        key = self.prefix + name
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            error = self._error(exc, key)
            if isinstance(error, ModelNotFound) and "bucket" not in error.message:
                return None
            raise error from None
        return self._file(
            name, int(head["ContentLength"]), str(head.get("ETag", "")), str(head.get("VersionId") or "")
        )

    def stat(self, name: str) -> RemoteFile | None:
        return self.head(name)

    def download(self, file: RemoteFile, dest: Path, meter: DownloadMeter) -> None:
        key = self.prefix + file.name
        etag, version_id = self._etags.get(file.name, ("", ""))
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if etag:
            kwargs["IfMatch"] = etag
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            body = self.client.get_object(**kwargs)["Body"]
            with open(dest, "wb") as out:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    out.write(chunk)
                    meter.advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except Exception as exc:
            error = self._error(exc, key)
            if isinstance(error, SourceUnavailable) and "interrupted" not in error.message:
                error = SourceUnavailable(
                    f"download of s3://{self.bucket}/{key} interrupted: {error.message}"
                )
            raise error from None


def s3_target(client: Any, uri: str, timeout_s: float) -> Target:
    """Find what ``uri`` names: one object, or the objects under a prefix (404 when neither)."""
    bucket, key = parse_s3_uri(uri)
    if key and not key.endswith("/"):
        parent, _, name = key.rpartition("/")
        directory = S3Dir(client, bucket, parent, timeout_s)
        file = directory.head(name)
        if file is not None:
            return Target(remote=directory, files={name: file}, single=name)
    prefix = key if not key or key.endswith("/") else key + "/"
    directory = S3Dir(client, bucket, prefix, timeout_s)
    files = directory.list_files()
    if not files:
        raise ModelNotFound(
            f"nothing at s3://{bucket}/{key}: no such object and no objects under that prefix"
        )
    return Target(remote=directory, files=files)


def fetch_s3(
    uri: str,
    source_uri: str,
    settings: Settings,
    progress: ProgressCallback,
    endpoint_url: str | None = None,
) -> Artifact:
    """Load the model at an ``s3://`` location (also used for MLflow artifacts kept in S3)."""
    client = make_s3_client(settings, endpoint_url)
    target = s3_target(client, uri, settings.download_timeout_s)
    return fetch_target(target, source_uri, progress, settings.cache_dir, settings.cache_max_bytes)


class S3Source:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fetch(self, uri: str, progress: ProgressCallback) -> Artifact:
        return fetch_s3(uri, uri, self.settings, progress)


register_source("s3", S3Source)
