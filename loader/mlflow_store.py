"""A registry that MLflow's own client reads directly: ``sqlite:///mlflow.db``,
``postgresql://…``, ``mysql://…``, ``file:./mlruns`` (``MLFLOW_TRACKING_URI`` that is
not an http(s) server).

``MlflowSource`` resolves ``models:/`` and ``runs:/`` with a handful of REST calls;
``MlflowStore`` answers those same calls from the store through ``MlflowClient``,
in the REST shapes (the entities' protobuf messages as JSON), so one resolution
logic serves a tracking server and a database alike. There is no network here,
so MLflow's retry and timeout settings do not come into play.

Errors: unknown model, version, alias, run -> 404 with MLflow's message; a
database file that does not exist -> 502 (never created empty by a read);
anything else the store raises -> 502 with its message.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import InvalidUri, ModelNotFound, SourceUnavailable
from .redact import redact

API = "/api/2.0/mlflow/"


def _json(entity: Any) -> dict[str, Any]:
    """An MLflow entity as its REST JSON (the same message the tracking server sends)."""
    import orjson
    from mlflow.utils.proto_json_utils import message_to_json

    return dict(orjson.loads(message_to_json(entity.to_proto())))


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///path`` URI (None for ``sqlite://`` in memory)."""
    parsed = urlparse(uri)
    path = unquote(parsed.path)
    if not path or path == "/":
        return None
    # sqlite:///relative/x.db is relative; sqlite:////abs/x.db is absolute (SQLAlchemy's rule).
    return Path(path[1:]) if path.startswith("/") else Path(path)


class MlflowStore:
    """The REST calls ``MlflowSource`` makes, answered by ``MlflowClient`` against a store."""

    host = ""  # no artifact proxy behind a database

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.display = redact(uri)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            if urlparse(self.uri).scheme.startswith("sqlite"):
                path = sqlite_path(self.uri)
                if path is not None and not path.is_file():
                    raise SourceUnavailable(
                        f"no MLflow database at {path} (MLFLOW_TRACKING_URI {self.display})"
                    )
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def json(
        self,
        method: str,
        endpoint: str,
        what: str,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        args = params or json or {}
        call = endpoint.removeprefix(API)
        try:
            return self._answer(call, args)
        except MlflowException as exc:
            message = str(exc.message if hasattr(exc, "message") else exc)
            code = str(getattr(exc, "error_code", ""))
            if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in message.lower():
                raise ModelNotFound(message) from None
            raise SourceUnavailable(f"MLflow store {self.display} failed on {what}: {message}") from None
        except (SourceUnavailable, ModelNotFound, InvalidUri):
            raise
        except Exception as exc:  # the database driver's own errors (locked, unreachable, schema)
            raise SourceUnavailable(
                f"MLflow store {self.display} failed on {what}: {type(exc).__name__}: {redact(str(exc))}"
            ) from None

    def _answer(self, call: str, args: dict[str, Any]) -> dict[str, Any]:
        client = self.client
        if call == "model-versions/get":
            return {"model_version": _json(client.get_model_version(args["name"], args["version"]))}
        if call == "registered-models/alias":
            return {"model_version": _json(client.get_model_version_by_alias(args["name"], args["alias"]))}
        if call == "registered-models/get-latest-versions":
            with warnings.catch_warnings():
                # Deprecated with stages, but what models:/<name>/<stage> and /latest mean;
                # the tracking server's REST endpoint is the same call.
                warnings.simplefilter("ignore", FutureWarning)
                versions = client.get_latest_versions(args["name"], stages=args.get("stages") or None)
            return {"model_versions": [_json(v) for v in versions]}
        if call == "model-versions/get-download-uri":
            return {"artifact_uri": client.get_model_version_download_uri(args["name"], args["version"])}
        if call.startswith("logged-models/") and call != "logged-models/search":
            model = client.get_logged_model(unquote(call.removeprefix("logged-models/")))
            return {"model": {"info": {"artifact_uri": model.artifact_location}}}
        if call == "logged-models/search":
            found = client.search_logged_models(
                experiment_ids=args["experiment_ids"],
                filter_string=args.get("filter"),
                max_results=args.get("max_results"),
            )
            return {
                "models": [
                    {"info": {"source_run_id": m.source_run_id, "artifact_uri": m.artifact_location}}
                    for m in found
                ]
            }
        if call == "runs/get":
            info = client.get_run(args["run_id"]).info
            return {"run": {"info": {"artifact_uri": info.artifact_uri, "experiment_id": info.experiment_id}}}
        raise InvalidUri(f"{call} is not available from an MLflow store ({self.display})")
