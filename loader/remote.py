"""Fetching a model out of a remote directory (an S3 prefix, an MLflow artifact path).

A source turns its URI into a :class:`Target`: a :class:`RemoteDir` plus the
files listed in it (names, sizes and content versions such as S3 ETags), and
optionally the one file the URI named. That listing is cheap (a LIST or HEAD,
never a GET) and gives the cache key, so a second load of unchanged content
makes no download. On a cache miss :func:`download_model` picks the model out of
the directory and downloads only what serving needs:

* an MLflow model directory (``MLmodel`` present): the onnx flavor's data file,
  after checking the flavor (422 otherwise) and reading the signature;
* otherwise ``model.onnx``, or the only ``*.onnx`` file;
* then the external-data files the ONNX graph references.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx
from onnx import TensorProto

from .artifact import Artifact, ProgressCallback
from .errors import InsufficientStorage, InvalidModel, LoadError, ModelNotFound, SourceUnavailable
from .local import MODEL_FILE
from .mlmodel import MLMODEL, SIDE_FILES, parse_mlmodel, safe_relpath
from .progress import DownloadMeter

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path relative to the remote directory
    size: int
    version: str = ""  # content identity known before download (ETag, version id); "" if none


class RemoteDir(Protocol):
    """A directory on a remote store (implemented by the S3 and MLflow sources)."""

    @property
    def location(self) -> str:
        """Printable URI of the directory, ending in '/', without secrets."""
        ...

    def stat(self, name: str) -> RemoteFile | None:
        """One file below the directory (for files a listing did not include)."""
        ...

    def download(self, file: RemoteFile, dest: Path, meter: DownloadMeter) -> None:
        """Stream ``file`` to ``dest`` (fsync'd), advancing ``meter``; raise LoadError on failure."""
        ...


@dataclass
class Target:
    remote: RemoteDir
    files: dict[str, RemoteFile]  # the directory's files (direct children)
    single: str | None = None  # the URI named this one file rather than the directory

    def cache_key(self) -> str:
        """Identity of the content: location plus every listed file's name, size and version."""
        parts = ";".join(f"{f.name}:{f.size}:{f.version}" for f in sorted(self.files.values(), key=_name))
        return f"{self.remote.location}|{self.single or ''}|{parts}"

    def expected_bytes(self) -> int:
        """Bytes the download will most likely fetch (for progress and making room)."""
        if self.single:
            return self.files[self.single].size
        return sum(f.size for f in self.files.values() if f.name not in SIDE_FILES)


def _name(file: RemoteFile) -> str:
    return file.name


@dataclass
class Downloaded:
    """What a download left in the temporary directory."""

    model_file: str  # relative path of the ONNX file
    files: dict[str, int]  # relative path -> size, everything written
    feature_names: list[str] | None = None
    feature_types: dict[str, str] = field(default_factory=dict)


def _tensors(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def external_data_files(model_path: Path, where: str) -> list[str]:
    """External-data files an ONNX file references, relative to its directory (first-use order)."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not ONNX at all
        raise InvalidModel(f"{where}: not a valid ONNX model ({type(exc).__name__})") from None
    found: list[str] = []
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        name = safe_relpath(location, where)
        if name not in found:
            found.append(name)
    return found


def _get(target: Target, name: str, where: str) -> RemoteFile:
    file = target.files.get(name) or target.remote.stat(name)
    if file is None:
        raise ModelNotFound(f"{where}: {name} is missing")
    return file


def download_model(target: Target, tmp: Path, meter: DownloadMeter) -> Downloaded:
    """Download the model files of ``target`` into the empty directory ``tmp``."""
    where = target.remote.location
    written: dict[str, int] = {}

    def fetch(file: RemoteFile) -> Path:
        dest = tmp / file.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        target.remote.download(file, dest, meter)
        size = dest.stat().st_size
        if size != file.size:
            raise SourceUnavailable(
                f"download of {where}{file.name} interrupted: got {size} of {file.size} bytes"
            )
        written[file.name] = size
        return dest

    names, types = None, {}
    if target.single:
        model_name = target.single
    elif MLMODEL in target.files:
        info = parse_mlmodel(fetch(target.files[MLMODEL]).read_bytes(), where)
        model_name, names, types = info.model_file, info.feature_names, info.feature_types
    elif MODEL_FILE in target.files:
        model_name = MODEL_FILE
    else:
        candidates = sorted(n for n in target.files if n.endswith(".onnx"))
        if len(candidates) != 1:
            listed = ", ".join(sorted(target.files)[:10]) or "nothing"
            raise ModelNotFound(f"no {MODEL_FILE} or {MLMODEL} in {where} (found: {listed})")
        model_name = candidates[0]
    model_path = fetch(_get(target, model_name, where))
    model_dir = posixpath.dirname(model_name)
    for location in external_data_files(model_path, where):
        # External-data locations are relative to the ONNX file's own directory.
        name = posixpath.join(model_dir, location) if model_dir else location
        if name in written:
            continue
        file = _get(target, name, where)
        if name not in target.files:
            meter.add_total(file.size)
        fetch(file)
    return Downloaded(model_file=model_name, files=written, feature_names=names, feature_types=types)


def local_io_error(exc: BaseException, where: str) -> LoadError | None:
    """A full disk while writing the cache is the server's problem, not the source's."""
    if isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, errno.EDQUOT}:
        return InsufficientStorage(f"no space left in the artifact cache while downloading {where}")
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fetch_target(
    target: Target,
    source_uri: str,
    progress: ProgressCallback,
    cache_dir: Path,
    cache_max_bytes: int,
) -> Artifact:
    """Serve ``target`` from the cache, downloading it on a miss (shared by concurrent loads)."""
    from .cache import get_cache

    cache = get_cache(cache_dir, cache_max_bytes)
    label = target.remote.location + (target.single or "")
    return cache.fetch(
        target.cache_key(),
        source_uri=source_uri,
        label=label,
        expected_bytes=target.expected_bytes(),
        download=lambda tmp, meter: download_model(target, tmp, meter),
        progress=progress,
    )
