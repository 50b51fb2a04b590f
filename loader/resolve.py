"""Where a model comes from: pick the source for a URI, fetch, verify, read the schema.

Sources register by URI scheme (:func:`register_source`); importing ``loader``
registers them all:

* ``/path``, ``file:///path``: ``loader.local``, served in place;
* ``s3://bucket/prefix/``, ``s3://bucket/key.onnx``: ``loader.s3_source`` (boto3),
  through the artifact cache;
* ``models:/<name>/<version|stage|latest>``, ``models:/<name>@<alias>``,
  ``runs:/<run_id>/<path>``, ``mlflow-artifacts:/<path>``: ``loader.mlflow_source``
  (the registry at ``MLFLOW_TRACKING_URI``), through the artifact cache.

Only the coordinator calls :func:`load_artifact`; workers load the verified
local file it returns. Downloads land in the artifact cache (``loader.cache``),
which returns them pinned: call ``loader.release(artifact)`` once the model is
unloaded.

When ``registry_uri`` is omitted the rule is, in order:

1. ``MLFLOW_TRACKING_URI`` set: the registered model ``models:/<model_id>/<version>``
   (``<version>`` may also be a stage or ``latest``);
2. ``AWS_S3_BUCKET`` set: ``s3://$AWS_S3_BUCKET/models/<model_id>/<version>/``;
3. otherwise the local repository: ``$MODEL_SERVER_MODEL_REPOSITORY/<model_id>/<version>/``.

Every URI passes the model-source policy first (``loader.policy``: allowed local
roots, S3 buckets and MLflow hosts; no credentials inside URIs).

When an MLflow model carries a column-based signature, its column names and
types define the record schema (``feature_names``/``feature_types``), ahead of
any ``feature_names`` in the ONNX metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from ipc.messages import ModelSchema
from model_server.settings import Settings

from . import policy
from .artifact import Artifact, ProgressCallback, no_progress
from .cache import release
from .errors import UnsupportedSource
from .inspect import inspect_model
from .local import LocalSource, repository_path


class Source(Protocol):
    def fetch(self, uri: str, progress: ProgressCallback) -> Artifact: ...


SourceFactory = Callable[[Settings], Source]

_FACTORIES: dict[str, SourceFactory] = {
    "": lambda settings: LocalSource(),
    "file": lambda settings: LocalSource(),
}


def register_source(scheme: str, factory: SourceFactory) -> None:
    _FACTORIES[scheme] = factory


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition(":")
    # "C:" style or plain relative paths have no scheme; schemes are 2+ letters.
    if not sep or len(head) < 2 or "/" in head:
        return ""
    return head.lower()


def default_uri(model_id: str, version: str, settings: Settings) -> str:
    if settings.mlflow_tracking_uri:
        return f"models:/{model_id}/{version}"
    if settings.aws_s3_bucket:
        return f"s3://{settings.aws_s3_bucket}/models/{model_id}/{version}/"
    return str(repository_path(settings.model_repository, model_id, version).resolve())


def source_for(uri: str, settings: Settings) -> Source:
    scheme = scheme_of(uri)
    factory = _FACTORIES.get(scheme)
    if factory is None:
        known = ", ".join(sorted(f"{s}:" for s in _FACTORIES if s)) + ", local paths"
        raise UnsupportedSource(f"unsupported registry_uri scheme {scheme!r}; supported: {known}")
    return factory(settings)


def load_artifact(
    model_id: str,
    version: str,
    registry_uri: str | None,
    settings: Settings,
    progress: ProgressCallback = no_progress,
) -> tuple[Artifact, ModelSchema]:
    """Resolve, fetch and verify; returns the local artifact and its schema (blocking)."""
    uri = registry_uri or default_uri(model_id, version, settings)
    # Checked here too (the coordinator checks on entry): the fetch must read what was checked.
    policy.admit(uri, settings)
    if scheme_of(uri) in {"", "file"}:
        # Fetch the resolved path, so a symlink swapped after the check changes nothing.
        resolved = policy.check_local(uri, settings)

        # A directory inside the roots may hold a model.onnx (or name an MLmodel data file)
        # that links out of them: the file to be served must pass too, before it is read.
        def check(path: Path) -> None:
            policy.check_local(str(path), settings)

        source = LocalSource(check=check)
        artifact = replace(source.fetch(str(resolved), progress), source_uri=uri)
    else:
        artifact = source_for(uri, settings).fetch(uri, progress)
    try:
        schema = inspect_model(artifact.path)
    except BaseException:
        release(artifact)
        raise
    if artifact.feature_names:
        schema.feature_names = list(artifact.feature_names)
    if artifact.feature_types:
        schema.feature_types = dict(artifact.feature_types)
    return artifact, schema
