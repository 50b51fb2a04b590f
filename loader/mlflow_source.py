"""Models in an MLflow registry (``MLFLOW_TRACKING_URI``), read through ``MlflowClient`` only.

URI forms
---------
* ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/<name>/<stage>``
  (``Production``, ``Staging``...; case-insensitive), ``models:/<name>/latest`` (the
  highest version), and MLflow 3's ``models:/<logged-model-id>`` (``m-...``);
* ``runs:/<run_id>/<path>``: ``<path>`` in the run's artifacts or, as MLflow 3
  logs models, the model logged by that run under the name ``<path>``;
* ``mlflow-artifacts:/<path>`` (or ``mlflow-artifacts://host:port/<path>``, the
  host being the tracking server or one in ``MODEL_SERVER_ALLOWED_MLFLOW_HOSTS``):
  artifacts that the tracking server proxies.

One path for every registry: ``MlflowClient(tracking_uri=registry_uri=MLFLOW_TRACKING_URI)``
answers for a tracking server (``http(s)://``) and for a store MLflow reads
directly (``sqlite:///mlflow.db``, ``postgresql://…``, ``file:./mlruns``) alike.
The registry tells where the artifacts live. S3 locations are read with boto3
directly (``loader.s3_source``: ETag cache keys, progress); ``mlflow-artifacts:``
locations are listed and streamed through MLflow's own artifact repository for
the tracking server; local ``file:`` locations are served in place; other stores
(GCS, Azure, HDFS...) go through MLflow's own download and are keyed in the cache
by content.

Timeouts and retries are MLflow's own, process-wide environment variables
(``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``…_MAX_RETRIES``…): :func:`configure_mlflow`
sets them from the settings. Only the coordinator downloads, so it calls it at
start; a source calls it again with its own settings (the same values there).
MLflow reads them on every request, and its defaults (120 s, 7 retries with
exponential backoff) would take minutes to report an unreachable registry.

Errors, by exception type (``MlflowException.error_code``, ``requests``/``urllib3``
exceptions in the cause chain), never by message text: unknown model, version,
alias, stage or run -> 404 with the registry's message; unauthenticated or denied
-> 403; unreachable -> 502; no answer in time -> 504; a model without the onnx
flavor -> 422 naming the supported flavors.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import socket
import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from model_server.settings import Settings

from .artifact import Artifact, ProgressCallback
from .errors import (
    AccessDenied,
    InvalidUri,
    LoadError,
    ModelNotFound,
    SourceTimeout,
    SourceUnavailable,
    UnsupportedSource,
)
from .local import LocalSource
from .mlmodel import MLMODEL, parse_mlmodel
from .policy import check_mlflow_host
from .progress import DownloadMeter
from .redact import redact, register_secret
from .remote import Downloaded, RemoteFile, Target, fetch_target, local_io_error
from .resolve import register_source, scheme_of

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3  # models:/ -> runs:/ -> storage, at most
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
PROGRESS_POLL_S = 0.25
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_DENIED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "UNAUTHORIZED"})
_NOT_MLFLOW = frozenset({"ENDPOINT_NOT_FOUND"})
_REJECTED = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"})
_env_lock = threading.Lock()


def mlflow_environment(settings: Settings) -> dict[str, str]:
    """MLflow's own HTTP variables for these settings."""
    timeout = str(max(1, math.ceil(settings.download_timeout_s)))  # MLflow takes whole seconds
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.mlflow_max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        # A Retry-After of an hour must not hold a fetch thread for an hour.
        "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
        "MLFLOW_DOWNLOAD_CHUNK_TIMEOUT": timeout,
        # Presigned multipart downloads would send requests to hosts the policy has not seen.
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def configure_mlflow(settings: Settings) -> None:
    """Set MLflow's timeout/retry variables in this process (MLflow reads them per request)."""
    with _env_lock:
        os.environ.update(mlflow_environment(settings))


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (causes, contexts, urllib3 reasons, args)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        item = stack.pop()
        if any(item is s for s in seen):
            continue
        seen.append(item)
        nested: list[Any] = [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
        stack.extend(n for n in nested if isinstance(n, BaseException))
    return seen


def _transport_error(
    chain: list[BaseException], what: str, server: str, timeout_s: float
) -> LoadError | None:
    """Unreachable (refused, DNS) -> 502; no answer in time -> 504; None if not a transport error."""
    import requests
    import urllib3

    # urllib3's NewConnectionError subclasses ConnectTimeoutError: test for it first.
    refused_types = (
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.NameResolutionError,
        ConnectionRefusedError,
        socket.gaierror,
    )
    if any(isinstance(e, refused_types) for e in chain):
        return SourceUnavailable(
            f"MLflow tracking server {server} is unreachable ({what}): connection refused"
        )
    timeout_types = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    if any(isinstance(e, timeout_types) for e in chain):
        return SourceTimeout(
            f"MLflow tracking server {server} did not answer within {timeout_s:g} s ({what})"
        )
    transport_types = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError)
    found = next((e for e in chain if isinstance(e, transport_types)), None)
    if found is not None:
        return SourceUnavailable(
            f"MLflow tracking server {server} is unreachable ({what}): {type(found).__name__}"
        )
    return None


def mlflow_error(exc: BaseException, what: str, server: str, timeout_s: float) -> LoadError:
    """Map what MlflowClient raised to the LoadError a user can act on (by type and error code)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, LoadError):
        return exc
    chain = _chain(exc)
    # A status answer (HTTPError from the artifact repository) before the transport check:
    # requests' HTTPError is a RequestException too.
    found = (
        local_io_error(exc, what)
        or _http_status_error(chain, what, server)
        or _transport_error(chain, what, server, timeout_s)
    )
    if found is not None:
        return found
    if isinstance(exc, MlflowException):
        message = redact(str(exc.message))
        make = _CODE_ERRORS.get(str(exc.error_code), _failed_on)
        return make(message, what, server)
    # The store's own driver (a locked or missing database, a schema error).
    return SourceUnavailable(f"MLflow registry {server} failed on {what}: {type(exc).__name__}")


def _http_status_error(chain: list[BaseException], what: str, server: str) -> LoadError | None:
    import requests

    http_error = next((e for e in chain if isinstance(e, requests.exceptions.HTTPError)), None)
    status = int(http_error.response.status_code) if http_error and http_error.response is not None else 0
    if not status:
        return None
    if status in {401, 403}:
        return AccessDenied(f"MLflow tracking server {server} denied {what} ({status})")
    if status == 404:
        return ModelNotFound(f"{what}: not found on {server}")
    return SourceUnavailable(f"MLflow tracking server {server} failed on {what}: {status}")


def _failed_on(message: str, what: str, server: str) -> LoadError:
    return SourceUnavailable(f"MLflow tracking server {server} failed on {what}: {message}")


# MlflowException error code -> (message, what, server) -> the LoadError to answer.
_CODE_ERRORS: dict[str, Callable[[str, str, str], LoadError]] = {
    **dict.fromkeys(_NOT_FOUND, lambda message, what, server: ModelNotFound(message)),
    **dict.fromkeys(
        _DENIED,
        lambda message, what, server: AccessDenied(
            f"MLflow tracking server {server} denied {what}: {message}"
        ),
    ),
    **dict.fromkeys(
        _NOT_MLFLOW,
        lambda message, what, server: SourceUnavailable(
            f"{server} does not look like an MLflow tracking server ({what})"
        ),
    ),
    **dict.fromkeys(
        _REJECTED, lambda message, what, server: InvalidUri(f"MLflow rejected {what}: {message}")
    ),
}


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///path`` URI (None for ``sqlite://`` in memory)."""
    path = unquote(urlparse(uri).path)
    if not path or path == "/":
        return None
    # sqlite:///relative/x.db is relative; sqlite:////abs/x.db is absolute (SQLAlchemy's rule).
    return Path(path[1:]) if path.startswith("/") else Path(path)


class Registry:
    """``MlflowClient`` for the configured registry, each call's errors mapped by type."""

    def __init__(self, uri: str, settings: Settings) -> None:
        self.uri = uri
        self.display = redact(uri)
        self.timeout_s = settings.download_timeout_s
        self.http = scheme_of(uri) in {"http", "https"}
        if self.http:
            from mlflow.utils.credentials import get_default_host_creds

            creds = get_default_host_creds(uri)  # type: ignore[no-untyped-call]
            register_secret(getattr(creds, "password", None))
            register_secret(getattr(creds, "token", None))
        elif scheme_of(uri).startswith("sqlite"):
            path = sqlite_path(uri)
            if path is not None and not path.is_file():  # a read must not create an empty registry
                raise SourceUnavailable(f"no MLflow database at {path} (MLFLOW_TRACKING_URI {self.display})")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                # get_latest_versions is deprecated with stages, but is what
                # models:/<name>/<stage> and /latest mean.
                warnings.simplefilter("ignore", FutureWarning)
                return getattr(self.client, method)(*args, **kwargs)
        except Exception as exc:
            raise mlflow_error(exc, what, self.display, self.timeout_s) from None


class ArtifactDir:
    """A directory of artifacts the MLflow server proxies (``mlflow-artifacts:``).

    Listed and downloaded by MLflow's own artifact repository for that server
    (``MlflowArtifactsRepository``: MLflow's credentials, timeout and retries).
    """

    def __init__(self, repo: Any, server: str, path: str, timeout_s: float) -> None:
        self.repo = repo
        self.server = server  # host:port, for messages and cache keys
        self.path = path.strip("/")
        self.timeout_s = timeout_s

    @property
    def location(self) -> str:
        return (
            f"mlflow-artifacts://{self.server}/{self.path}/"
            if self.path
            else f"mlflow-artifacts://{self.server}/"
        )

    def _error(self, exc: BaseException, what: str) -> LoadError:
        return mlflow_error(exc, what, self.server, self.timeout_s)

    def list_files(self, path: str | None = None) -> dict[str, RemoteFile]:
        """Files directly under ``path`` (default: this directory), by name."""
        path = self.path if path is None else path.strip("/")
        try:
            infos = self.repo.list_artifacts(path or None)
        except Exception as exc:
            raise self._error(exc, f"listing {path or '/'}") from None
        files: dict[str, RemoteFile] = {}
        for info in infos:
            if info.is_dir:
                continue
            name = posixpath.basename(str(info.path))
            if name:
                files[name] = RemoteFile(name=name, size=int(info.file_size or 0))
        return files

    def stat(self, name: str) -> RemoteFile | None:
        parent, _, base = posixpath.join(self.path, name).rpartition("/")
        file = self.list_files(parent).get(base)
        return None if file is None else RemoteFile(name=name, size=file.size, version=file.version)

    def download(self, file: RemoteFile, dest: Path, meter: DownloadMeter) -> None:
        remote = posixpath.join(self.path, file.name)
        where = f"{self.location}{file.name}"
        # MLflow streams the file to disk itself; progress comes from the file's growing size.
        stop = threading.Event()
        counted = [0]

        def watch() -> None:
            while not stop.wait(PROGRESS_POLL_S):
                try:
                    size = dest.stat().st_size
                except FileNotFoundError:
                    continue
                if size > counted[0]:
                    meter.advance(size - counted[0])
                    counted[0] = size

        watcher = threading.Thread(target=watch, name="mlflow-progress", daemon=True)
        watcher.start()
        try:
            # _download_file is the one method every MLflow artifact repository implements;
            # the public download_artifacts runs it on a pool and loses the exception's type.
            self.repo._download_file(remote, str(dest))
            with open(dest, "rb+") as out:
                os.fsync(out.fileno())
        except Exception as exc:
            error = self._error(exc, f"downloading {remote}")
            if isinstance(error, SourceUnavailable):
                error = SourceUnavailable(f"download of {where} interrupted: {error.message}")
            raise error from None
        finally:
            stop.set()
            watcher.join()
        size = dest.stat().st_size
        if size > counted[0]:
            meter.advance(size - counted[0])


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.strip("/") if path.strip("/") else base


def parse_models_uri(uri: str) -> tuple[str, str, str]:
    """``models:/...`` -> (kind, name, ref); kind is version, alias, stage, latest or logged."""
    rest = uri[len("models:") :]
    path = rest.lstrip("/")
    parts = path.split("/")
    if not rest.startswith("/") or not path or len(parts) > 2 or not all(parts):
        raise InvalidUri(
            f"not a models:/ URI: {uri!r}; expected models:/<name>/<version|stage|latest> "
            "or models:/<name>@<alias>"
        )
    if len(parts) == 1:
        if "@" in path:
            name, _, alias = path.rpartition("@")
            if not name or not alias:
                raise InvalidUri(f"not a models:/ URI: {uri!r}; expected models:/<name>@<alias>")
            return "alias", name, alias
        return "logged", path, ""
    name, suffix = parts
    if suffix.isdigit():
        return "version", name, suffix
    if suffix.lower() == "latest":
        return "latest", name, ""
    return "stage", name, suffix


def parse_runs_uri(uri: str) -> tuple[str, str]:
    path = uri[len("runs:") :].lstrip("/")
    run_id, _, artifact_path = path.partition("/")
    if not run_id:
        raise InvalidUri(f"not a runs:/ URI: {uri!r}; expected runs:/<run_id>/<path>")
    return run_id, artifact_path.strip("/")


class MlflowSource:
    """``models:``, ``runs:`` and ``mlflow-artifacts:`` URIs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tracking_uri = settings.mlflow_tracking_uri
        self._registry: Registry | None = None
        configure_mlflow(settings)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            if not self.tracking_uri:
                raise UnsupportedSource(
                    "models:/ and runs:/ URIs need MLFLOW_TRACKING_URI (the MLflow tracking server)"
                )
            self._registry = Registry(self.tracking_uri, self.settings)
        return self._registry

    # --- resolving -------------------------------------------------------------------
    def _alias(self, name: str, alias: str) -> Any:
        reg = self.registry
        what = f"model {name!r} alias {alias!r}"
        try:
            return reg.call(what, "get_model_version_by_alias", name, alias)
        except InvalidUri:
            # MLflow answers a missing alias with INVALID_PARAMETER_VALUE: look, rather than read
            # the message, whether the model or the alias is what is missing.
            model = reg.call(f"registered model {name!r}", "get_registered_model", name)
            if alias not in (getattr(model, "aliases", None) or {}):
                raise ModelNotFound(f"alias {alias!r} of registered model {name!r} not found") from None
            raise

    def _version(self, kind: str, name: str, ref: str) -> Any:
        reg = self.registry
        if kind == "version":
            return reg.call(f"model {name!r} version {ref}", "get_model_version", name, ref)
        if kind == "alias":
            return self._alias(name, ref)
        where = f" in stage {ref!r}" if kind == "stage" else ""
        versions = reg.call(
            f"latest version of model {name!r}{where}",
            "get_latest_versions",
            name,
            stages=[ref] if kind == "stage" else None,
        )
        if kind == "stage":
            versions = [v for v in versions if str(v.current_stage).lower() == ref.lower()]
        if not versions:
            raise ModelNotFound(f"registered model {name!r} has no version{where}")
        return max(versions, key=lambda v: int(v.version))

    def _models_location(self, uri: str) -> str:
        kind, name, ref = parse_models_uri(uri)
        reg = self.registry
        if kind == "logged":
            model = reg.call(f"logged model {name!r}", "get_logged_model", name)
            location = str(model.artifact_location or "")
            if not location:
                raise ModelNotFound(f"logged model {name!r} has no artifact location")
            return location
        version = self._version(kind, name, ref)
        number = str(version.version)
        location = str(
            reg.call(f"model {name!r} version {number}", "get_model_version_download_uri", name, number)
            or version.source
            or ""
        )
        log.info(
            "%s is model %r version %s (run %s) at %s",
            uri,
            name,
            number,
            version.run_id or "-",
            redact(location),
        )
        return location

    def _find_logged_model(self, experiment_id: str, name: str, run_id: str) -> str | None:
        found = self.registry.call(
            f"logged model {name!r} of run {run_id}",
            "search_logged_models",
            experiment_ids=[experiment_id],
            filter_string=f"name = '{name}'",
            max_results=100,
        )
        for model in found:
            if model.source_run_id == run_id and model.artifact_location:
                return str(model.artifact_location)
        return None

    # --- fetching ---------------------------------------------------------------------
    def fetch(self, uri: str, progress: ProgressCallback) -> Artifact:
        return self._fetch(uri, uri, progress, MAX_REDIRECTS)

    def _fetch(self, location: str, source_uri: str, progress: ProgressCallback, depth: int) -> Artifact:
        scheme = scheme_of(location)
        if scheme in {"models", "runs"}:
            if depth <= 0:
                raise SourceUnavailable(f"{source_uri} resolves through too many registry references")
            if scheme == "runs":
                return self._fetch_run(location, source_uri, progress, depth - 1)
            return self._fetch(self._models_location(location), source_uri, progress, depth - 1)
        if scheme == "s3":
            from .s3_source import fetch_s3

            endpoint = self.settings.mlflow_s3_endpoint_url
            return fetch_s3(location, source_uri, self.settings, progress, endpoint)
        if scheme == "mlflow-artifacts" or (scheme in {"http", "https"} and ARTIFACTS_API in location):
            return self._fetch_dir(self._artifact_dir(location), source_uri, progress)
        if scheme in {"", "file"}:
            # The configured registry's own artifact root: trusted like the registry.
            return replace(LocalSource().fetch(location, progress), source_uri=source_uri)
        return self._fetch_generic(location, source_uri, progress)

    def _fetch_run(self, uri: str, source_uri: str, progress: ProgressCallback, depth: int) -> Artifact:
        run_id, path = parse_runs_uri(uri)
        info = self.registry.call(f"run {run_id}", "get_run", run_id).info
        artifact_uri = str(info.artifact_uri or "")
        try:
            return self._fetch(_join(artifact_uri, path), source_uri, progress, depth)
        except ModelNotFound:
            if not path:
                raise
        # MLflow 3 keeps a run's logged models apart from its artifacts.
        name, _, rest = path.partition("/")
        location = self._find_logged_model(str(info.experiment_id or ""), name, run_id)
        if location is None:
            raise ModelNotFound(f"run {run_id} has no artifact {path!r} and logged no model named {name!r}")
        return self._fetch(_join(location, rest), source_uri, progress, depth)

    def _artifact_dir(self, location: str) -> ArtifactDir:
        """The proxied directory ``location`` names, after the host policy (before any connection)."""
        check_mlflow_host(location, self.settings)
        tracking = self.tracking_uri or ""
        if scheme_of(tracking) not in {"http", "https"}:
            raise UnsupportedSource(
                "mlflow-artifacts:/ URIs need an http(s) MLFLOW_TRACKING_URI "
                "(the MLflow server that proxies them)"
            )
        parsed = urlparse(location)
        if parsed.scheme.lower() in {"http", "https"}:
            base, _, path = location.partition(ARTIFACTS_API)
            location = f"mlflow-artifacts://{urlparse(base).netloc}{path or '/'}"
            parsed = urlparse(location)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # The repository's root is the server's artifact root; paths are relative to it.
        root = f"mlflow-artifacts://{parsed.netloc}/" if parsed.netloc else "mlflow-artifacts:/"
        try:
            repo = get_artifact_repository(root, tracking_uri=tracking)
        except Exception as exc:
            raise mlflow_error(
                exc, "the artifact proxy", redact(tracking), self.settings.download_timeout_s
            ) from None
        server = parsed.netloc.rpartition("@")[2] or urlparse(tracking).netloc.rpartition("@")[2]
        return ArtifactDir(repo, server, unquote(parsed.path), self.settings.download_timeout_s)

    def _fetch_dir(self, directory: ArtifactDir, source_uri: str, progress: ProgressCallback) -> Artifact:
        files = directory.list_files()
        if files:
            target = Target(remote=directory, files=files)
        else:  # a single file: list its parent
            parent, _, name = directory.path.rpartition("/")
            parent_dir = ArtifactDir(directory.repo, directory.server, parent, directory.timeout_s)
            file = parent_dir.list_files().get(name) if name else None
            if file is None:
                raise ModelNotFound(f"nothing at {directory.location.rstrip('/')}")
            target = Target(remote=parent_dir, files={name: file}, single=name)
        return fetch_target(
            target, source_uri, progress, self.settings.cache_dir, self.settings.cache_max_bytes
        )

    def _fetch_generic(self, location: str, source_uri: str, progress: ProgressCallback) -> Artifact:
        """Stores without a direct reader here: MLflow downloads, the cache keys by content."""
        from .cache import get_cache

        def download(tmp: Path, meter: DownloadMeter) -> Downloaded:
            import mlflow.artifacts

            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=location, dst_path=str(tmp), tracking_uri=self.tracking_uri
                    )
                )
            except Exception as exc:
                raise SourceUnavailable(
                    f"MLflow could not download {redact(location)}: {type(exc).__name__}"
                ) from None
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
            meter.add_total(sum(files.values()))
            meter.advance(sum(files.values()))
            if local.is_file():
                model = local
            elif (local / MLMODEL).is_file():
                info = parse_mlmodel((local / MLMODEL).read_bytes(), redact(location))
                model = local / info.model_file
                names, types = info.feature_names, info.feature_types
                return Downloaded(str(model.relative_to(tmp)), files, names, dict(types))
            else:
                onnx_files = sorted(local.glob("*.onnx"))
                if len(onnx_files) != 1:
                    raise ModelNotFound(f"no model.onnx or MLmodel in {redact(location)}")
                model = onnx_files[0]
            return Downloaded(model_file=str(model.relative_to(tmp)), files=files)

        cache = get_cache(self.settings.cache_dir, self.settings.cache_max_bytes)
        return cache.fetch(
            location,
            source_uri=source_uri,
            label=location,
            expected_bytes=0,
            download=download,
            progress=progress,
            key_is_content=False,
        )


register_source("models", MlflowSource)
register_source("runs", MlflowSource)
register_source("mlflow-artifacts", MlflowSource)
