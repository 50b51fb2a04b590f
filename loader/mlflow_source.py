"""Models in an MLflow tracking server (``MLFLOW_TRACKING_URI``).

URI forms
---------
* ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/<name>/<stage>``
  (``Production``, ``Staging``...; case-insensitive), ``models:/<name>/latest`` (the
  highest version), and MLflow 3's ``models:/<logged-model-id>`` (``m-...``);
* ``runs:/<run_id>/<path>``: ``<path>`` in the run's artifacts or, as MLflow 3
  logs models, the model logged by that run under the name ``<path>``;
* ``mlflow-artifacts:/<path>`` (or ``mlflow-artifacts://host:port/<path>``):
  artifacts that the tracking server proxies.

The registry tells where the artifacts live. S3 locations are read with boto3
directly (``loader.s3_source``: ETag cache keys, progress); ``mlflow-artifacts:``
locations are streamed through the tracking server; local ``file:`` locations are
served in place; other stores (GCS, Azure, HDFS...) go through MLflow's own
download and are keyed in the cache by content.

The model must be an MLflow model directory with the ``onnx`` flavor (see
``loader.mlmodel``) or a plain ``.onnx`` file.

Registry calls go through MLflow's REST client (``mlflow.utils.rest_utils``),
which resolves MLflow's own credentials (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, client certificates...), with
``download_timeout_s`` as timeout and ``MLFLOW_MAX_RETRIES`` retries.
``MlflowClient`` is not used because its timeout and retries come only from
process-wide environment variables (by default 120 s and 7 retries with
exponential backoff: minutes before an unreachable registry is reported).
A tracking URI that is not http(s) (``sqlite:``, ``postgresql:``, ``file:``...) is
read through ``MlflowClient`` instead (``loader.mlflow_store``), with the same
resolution logic.

Errors: unknown model, version, alias, stage or run -> 404 with the registry's
message; 401/403 -> 403; server unreachable -> 502; no answer in time -> 504;
a model without the onnx flavor -> 422 naming the supported flavors.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

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
from .mlflow_store import MlflowStore
from .mlmodel import MLMODEL, parse_mlmodel
from .policy import check_mlflow_host
from .progress import DownloadMeter
from .redact import redact, register_secret
from .remote import CHUNK_BYTES, Downloaded, RemoteFile, Target, fetch_target, local_io_error
from .resolve import register_source, scheme_of

log = logging.getLogger(__name__)

MLFLOW_MAX_RETRIES = 2
MLFLOW_BACKOFF_FACTOR = 0.5
MAX_REDIRECTS = 3  # models:/ -> runs:/ -> storage, at most
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_ACCESS_CODES = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"})


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


def _transport_error(exc: BaseException, what: str, server: str, timeout_s: float) -> LoadError:
    """Unreachable (refused, DNS) -> 502; no answer in time -> 504."""
    import requests
    import urllib3

    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    refused = any(
        isinstance(e, urllib3.exceptions.NewConnectionError | ConnectionRefusedError | socket.gaierror)
        for e in chain
    ) or any(word in text for word in ("refused", "name or service not known", "failed to resolve"))
    if not refused and (
        any(
            isinstance(e, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError)
            for e in chain
        )
        or "timed out" in text
    ):
        return SourceTimeout(
            f"MLflow tracking server {server} did not answer within {timeout_s:g} s ({what})"
        )
    reason = "connection refused" if refused else type(exc).__name__
    return SourceUnavailable(f"MLflow tracking server {server} is unreachable ({what}): {reason}")


class MlflowHttp:
    """REST calls to one MLflow server with bounded timeout and retries."""

    def __init__(self, host: str, timeout_s: float) -> None:
        from mlflow.utils.credentials import get_default_host_creds

        self.host = host.rstrip("/")
        self.display = redact(self.host)
        self.timeout_s = timeout_s
        self.creds = get_default_host_creds(self.host)  # type: ignore[no-untyped-call]
        register_secret(getattr(self.creds, "password", None))
        register_secret(getattr(self.creds, "token", None))

    def request(self, method: str, endpoint: str, what: str, **kwargs: Any) -> Any:
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(  # type: ignore[no-untyped-call]
                self.creds,
                endpoint,
                method,
                max_retries=MLFLOW_MAX_RETRIES,
                backoff_factor=MLFLOW_BACKOFF_FACTOR,
                backoff_jitter=0.0,
                timeout=self.timeout_s,
                raise_on_status=False,
                respect_retry_after_header=False,
                **kwargs,
            )
        except Exception as exc:
            raise _transport_error(exc, what, self.display, self.timeout_s) from None
        if response.status_code != 200:
            raise self._status_error(response, what)
        return response

    def json(self, method: str, endpoint: str, what: str, **kwargs: Any) -> dict[str, Any]:
        response = self.request(method, endpoint, what, **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise SourceUnavailable(
                f"{self.display} answered {what} with something that is not JSON"
            ) from None
        return body if isinstance(body, dict) else {}

    def _status_error(self, response: Any, what: str) -> LoadError:
        status = int(response.status_code)
        code, message = "", ""
        try:
            body = response.json()
            if isinstance(body, dict):
                code, message = str(body.get("error_code", "")), str(body.get("message", ""))
        except ValueError:
            pass
        response.close()
        if code == "RESOURCE_DOES_NOT_EXIST" or (code and status == 404):
            return ModelNotFound(message or f"{what}: not found")
        if code == "INVALID_PARAMETER_VALUE" and "not found" in message.lower():
            return ModelNotFound(message)  # e.g. "Registered model alias champion not found."
        if status in {401, 403} or code in _ACCESS_CODES:
            return AccessDenied(f"MLflow tracking server {self.display} denied {what}: {message or status}")
        if status == 404:
            return SourceUnavailable(
                f"{self.display} does not look like an MLflow tracking server (404 on {what})"
            )
        if status >= 500 or status == 429:
            return SourceUnavailable(
                f"MLflow tracking server {self.display} failed on {what}: {status} {message}"
            )
        return InvalidUri(f"MLflow rejected {what}: {message or status}")


class ProxiedDir:
    """A directory of artifacts proxied by an MLflow server (``mlflow-artifacts:``)."""

    def __init__(self, http: MlflowHttp, path: str) -> None:
        self.http = http
        self.path = path.strip("/")

    @property
    def location(self) -> str:
        return f"mlflow-artifacts://{urlparse(self.http.host).netloc}/{self.path}/"

    def list_files(self, path: str | None = None) -> dict[str, RemoteFile]:
        path = self.path if path is None else path
        body = self.http.json("GET", ARTIFACTS_API, f"listing {path or '/'}", params={"path": path})
        files: dict[str, RemoteFile] = {}
        for item in body.get("files", []):
            if not isinstance(item, dict) or item.get("is_dir"):
                continue
            name = posixpath.basename(str(item.get("path", "")))
            if name:
                files[name] = RemoteFile(name=name, size=int(item.get("file_size", 0) or 0))
        return files

    def stat(self, name: str) -> RemoteFile | None:
        parent, _, base = posixpath.join(self.path, name).rpartition("/")
        return self.list_files(parent).get(base)

    def download(self, file: RemoteFile, dest: Path, meter: DownloadMeter) -> None:
        remote = posixpath.join(self.path, file.name)
        what = f"downloading {remote}"
        response = self.http.request("GET", f"{ARTIFACTS_API}/{quote(remote)}", what, stream=True)
        try:
            with open(dest, "wb") as out:
                for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                    out.write(chunk)
                    meter.advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except LoadError:
            raise
        except Exception as exc:
            local = local_io_error(exc, f"{self.location}{file.name}")
            if local is not None:
                raise local from None
            error = _transport_error(exc, what, self.http.display, self.http.timeout_s)
            if isinstance(error, SourceUnavailable):
                error = SourceUnavailable(
                    f"download of {self.location}{file.name} interrupted: {error.message}"
                )
            raise error from None
        finally:
            response.close()


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
        self._registry: MlflowHttp | MlflowStore | None = None

    # --- the registry -----------------------------------------------------------------
    @property
    def registry(self) -> MlflowHttp | MlflowStore:
        if self._registry is None:
            uri = self.tracking_uri
            if not uri:
                raise UnsupportedSource(
                    "models:/ and runs:/ URIs need MLFLOW_TRACKING_URI (the MLflow tracking server)"
                )
            if scheme_of(uri) in {"http", "https"}:
                self._registry = MlflowHttp(uri, self.settings.download_timeout_s)
            else:
                self._registry = MlflowStore(uri)
        return self._registry

    def _version(self, kind: str, name: str, ref: str) -> dict[str, Any]:
        reg = self.registry
        if kind == "version":
            body = reg.json(
                "GET",
                "/api/2.0/mlflow/model-versions/get",
                f"model {name!r} version {ref}",
                params={"name": name, "version": ref},
            )
            return dict(body.get("model_version") or {})
        if kind == "alias":
            body = reg.json(
                "GET",
                "/api/2.0/mlflow/registered-models/alias",
                f"model {name!r} alias {ref!r}",
                params={"name": name, "alias": ref},
            )
            return dict(body.get("model_version") or {})
        request: dict[str, Any] = {"name": name}
        if kind == "stage":
            request["stages"] = [ref]
        body = reg.json(
            "POST",
            "/api/2.0/mlflow/registered-models/get-latest-versions",
            f"latest version of model {name!r}" + (f" in stage {ref!r}" if ref else ""),
            json=request,
        )
        versions = [v for v in body.get("model_versions", []) if isinstance(v, dict)]
        if kind == "stage":
            versions = [v for v in versions if str(v.get("current_stage", "")).lower() == ref.lower()]
        if not versions:
            where = f" in stage {ref!r}" if kind == "stage" else ""
            raise ModelNotFound(f"registered model {name!r} has no version{where}")
        return max(versions, key=lambda v: int(v.get("version", 0)))

    def _models_location(self, uri: str) -> str:
        kind, name, ref = parse_models_uri(uri)
        reg = self.registry
        if kind == "logged":
            body = reg.json("GET", f"/api/2.0/mlflow/logged-models/{quote(name)}", f"logged model {name!r}")
            info = (body.get("model") or {}).get("info") or {}
            location = str(info.get("artifact_uri", ""))
            if not location:
                raise ModelNotFound(f"logged model {name!r} has no artifact location")
            return location
        version = self._version(kind, name, ref)
        number = str(version.get("version", ref))
        body = reg.json(
            "GET",
            "/api/2.0/mlflow/model-versions/get-download-uri",
            f"model {name!r} version {number}",
            params={"name": name, "version": number},
        )
        location = str(body.get("artifact_uri", "")) or str(version.get("source", ""))
        log.info(
            "%s is model %r version %s (run %s) at %s",
            uri,
            name,
            number,
            version.get("run_id") or "-",
            redact(location),
        )
        return location

    def _find_logged_model(self, experiment_id: str, name: str, run_id: str) -> str | None:
        body = self.registry.json(
            "POST",
            "/api/2.0/mlflow/logged-models/search",
            f"logged model {name!r} of run {run_id}",
            json={"experiment_ids": [experiment_id], "filter": f"name = '{name}'", "max_results": 100},
        )
        for model in body.get("models", []):
            info = (model or {}).get("info") or {}
            if info.get("source_run_id") == run_id and info.get("artifact_uri"):
                return str(info["artifact_uri"])
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
        if scheme == "mlflow-artifacts":
            return self._fetch_proxied(location, source_uri, progress)
        if scheme in {"http", "https"} and ARTIFACTS_API in location:
            check_mlflow_host(location, self.settings)
            base, _, path = location.partition(ARTIFACTS_API)
            return self._fetch_dir(
                ProxiedDir(MlflowHttp(base, self.settings.download_timeout_s), path), source_uri, progress
            )
        if scheme in {"", "file"}:
            return replace(LocalSource().fetch(location, progress), source_uri=source_uri)
        return self._fetch_generic(location, source_uri, progress)

    def _fetch_run(self, uri: str, source_uri: str, progress: ProgressCallback, depth: int) -> Artifact:
        run_id, path = parse_runs_uri(uri)
        body = self.registry.json(
            "GET", "/api/2.0/mlflow/runs/get", f"run {run_id}", params={"run_id": run_id}
        )
        info = (body.get("run") or {}).get("info") or {}
        artifact_uri = str(info.get("artifact_uri", ""))
        try:
            return self._fetch(_join(artifact_uri, path), source_uri, progress, depth)
        except ModelNotFound:
            if not path:
                raise
        # MLflow 3 keeps a run's logged models apart from its artifacts.
        name, _, rest = path.partition("/")
        location = self._find_logged_model(str(info.get("experiment_id", "")), name, run_id)
        if location is None:
            raise ModelNotFound(f"run {run_id} has no artifact {path!r} and logged no model named {name!r}")
        return self._fetch(_join(location, rest), source_uri, progress, depth)

    def _proxied(self, location: str) -> ProxiedDir:
        check_mlflow_host(location, self.settings)  # before any connection: credentials go with it
        parsed = urlparse(location)
        tracking = urlparse(self.tracking_uri or "")
        if parsed.netloc:
            scheme = tracking.scheme if tracking.scheme in {"http", "https"} else "http"
            base = f"{scheme}://{parsed.netloc}{tracking.path.rstrip('/')}"
        elif self.tracking_uri and scheme_of(self.tracking_uri) in {"http", "https"}:
            base = self.registry.host
        else:
            raise UnsupportedSource(
                "mlflow-artifacts:/ URIs need an http(s) MLFLOW_TRACKING_URI "
                "(the MLflow server that proxies them)"
            )
        known = self._registry
        http = known if isinstance(known, MlflowHttp) and base == known.host else None
        return ProxiedDir(http or MlflowHttp(base, self.settings.download_timeout_s), parsed.path)

    def _fetch_proxied(self, location: str, source_uri: str, progress: ProgressCallback) -> Artifact:
        return self._fetch_dir(self._proxied(location), source_uri, progress)

    def _fetch_dir(self, directory: ProxiedDir, source_uri: str, progress: ProgressCallback) -> Artifact:
        files = directory.list_files()
        if files:
            target = Target(remote=directory, files=files)
        else:  # a single file: list its parent
            parent, _, name = directory.path.rpartition("/")
            parent_dir = ProxiedDir(directory.http, parent)
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
