"""Models on the local disk: plain paths, ``file://`` URIs and the local model repository."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from model_server import naming

from .artifact import Artifact, ProgressCallback
from .errors import InvalidModel, ModelNotFound
from .inspect import sha256_file

MODEL_FILE = "model.onnx"


def check_part(kind: str, value: str) -> str:
    """model_id / version become path parts: no separators, no '..'."""
    try:
        return naming.check_part(kind, value)
    except naming.InvalidName as exc:
        raise InvalidModel(str(exc)) from None


def path_from_uri(uri: str) -> Path:
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in {"", "localhost"}:
            raise InvalidModel(f"file URI {uri!r} names a remote host")
        return Path(unquote(parsed.path))
    return Path(uri).expanduser()


def find_model_file(path: Path) -> Path:
    """A file, or a directory holding model.onnx (a repository version or an MLflow model dir)."""
    if path.is_dir():
        candidate = path / MODEL_FILE
        if candidate.is_file():
            return candidate
        onnx_files = sorted(path.glob("*.onnx"))
        if len(onnx_files) == 1:
            return onnx_files[0]
        raise ModelNotFound(f"no {MODEL_FILE} in directory {path}")
    if path.is_file():
        return path
    raise ModelNotFound(f"model path {path} does not exist")


class LocalSource:
    """Serves files in place: nothing is copied, the checksum is computed on load.

    A directory holding an ``MLmodel`` is an MLflow model directory: it must have
    the onnx flavor, whose data file is the model, and its signature gives the
    record schema.
    """

    def __init__(self, check: Callable[[Path], None] | None = None) -> None:
        # Called with the file to be served before it is read (the source policy).
        self.check = check

    def fetch(self, uri: str, progress: ProgressCallback) -> Artifact:
        from .mlmodel import MLMODEL, parse_mlmodel

        given = path_from_uri(uri)
        names: list[str] | None = None
        types: dict[str, str] = {}
        if given.is_dir() and (given / MLMODEL).is_file():
            if self.check is not None:
                self.check(given / MLMODEL)
            info = parse_mlmodel((given / MLMODEL).read_bytes(), str(given))
            path = given / info.model_file
            if not path.is_file():
                raise ModelNotFound(f"{given}: the MLmodel names {info.model_file}, which is missing")
            names, types = info.feature_names, info.feature_types
        else:
            path = find_model_file(given)
        if self.check is not None:
            self.check(path)
        return Artifact(
            path=path.resolve(),
            sha256=sha256_file(path),
            size=path.stat().st_size,
            source_uri=uri,
            feature_names=names,
            feature_types=types,
        )


def repository_path(repository: Path, model_id: str, version: str) -> Path:
    return Path(repository) / check_part("model_id", model_id) / check_part("version", version)


def repository_index(repository: Path) -> list[tuple[str, str]]:
    """Every (model_id, version) in the local repository that holds a model file."""
    found: list[tuple[str, str]] = []
    repo = Path(repository)
    if not repo.is_dir():
        return found
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if (version_dir / MODEL_FILE).is_file():
                found.append((model_dir.name, version_dir.name))
    return found
