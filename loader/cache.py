"""Verified, content-keyed local cache of downloaded model artifacts.

Layout under ``settings.cache_dir`` (``MODEL_SERVER_CACHE_DIR``)::

    objects/<digest>/model.onnx     one verified artifact per directory: the ONNX file,
    objects/<digest>/<data files>   its external-data files, the MLmodel if any,
    objects/<digest>/meta.json      and its metadata (written before the rename)
    tmp/<pid>-<random>/             downloads in progress, swept at start

``<digest>`` is the sha256 of the artifact's *key*: what identifies the content
before any byte is fetched (S3 ETags and sizes from a LIST/HEAD; an MLflow
artifact path and sizes), or, for stores that give no such identity, the
sha256 of the downloaded files. A second load of the same content therefore
finds the entry with a listing request and makes no download; changed content
has another key and is fetched anew.

A download goes to a fresh ``tmp/`` directory. Only after every file has its
announced size, the ONNX checker accepts the model, the files are fsync'd and
``meta.json`` is written is the directory renamed into ``objects/`` (an atomic
rename on one file system). A failed or interrupted download is deleted; one
cut short by a crash stays in ``tmp/`` where nothing reads it, and is swept
when the cache is next opened. ``objects/`` is re-read at start, so the cache
is reused across restarts; entries whose files are missing or have the wrong
size are dropped.

Concurrent loads of one key share one download: the first caller downloads, the
others wait for it, receive its progress events, and get its result or error.

Size bound and pins
-------------------
``cache_max_bytes`` bounds the total size (0: no bound). When a new artifact
needs room, unpinned entries are evicted least recently used first (``meta.json``'s
mtime records the last use, so the order survives restarts). Pinned entries are
never evicted; if they alone exceed the bound a warning says so.

API for the coordinator (the only process that downloads):

* :func:`loader.load_artifact` returns a cached artifact **pinned** once;
* :func:`release` (``loader.release``) drops that pin. Call it exactly once per
  successful ``load_artifact`` when the model is unloaded, or when its load
  fails after ``load_artifact`` returned (workers could not load it). A model
  that workers merely evicted from memory keeps its pin, since a worker may
  need the file again;
* :func:`pin` adds a pin for an artifact the coordinator keeps using without
  calling ``load_artifact`` again (e.g. a path restored from saved state);
* :meth:`ArtifactCache.usage` reports entries, bytes and pins (for metrics).

Artifacts served from local paths are not in the cache: pin and release
ignore them. One process per cache directory: pins and in-flight downloads live
in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import checker

from ipc.arena import pid_alive

from .artifact import Artifact, ProgressCallback
from .errors import InvalidModel, LoadError
from .inspect import sha256_file
from .progress import DownloadMeter, human_bytes
from .redact import redact
from .remote import Downloaded, fsync_dir, local_io_error

log = logging.getLogger(__name__)

FORMAT = 1
META = "meta.json"
OBJECTS = "objects"
TMP = "tmp"
# A temporary directory this old is swept even if its pid looks alive (pid reuse).
STALE_TMP_S = 24 * 3600.0

Downloader = Callable[[Path, DownloadMeter], Downloaded]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Entry:
    digest: str
    dir: Path
    model_file: str
    sha256: str
    size: int
    files: dict[str, int]
    source_uri: str
    feature_names: list[str] | None = None
    feature_types: dict[str, str] = field(default_factory=dict)
    last_used: float = 0.0

    @property
    def path(self) -> Path:
        return self.dir / self.model_file

    def intact(self) -> bool:
        """Every file present with its recorded size (a cheap check, no hashing)."""
        try:
            return all((self.dir / name).stat().st_size == size for name, size in self.files.items())
        except OSError:
            return False

    def artifact(self, source_uri: str, downloaded: bool) -> Artifact:
        return Artifact(
            path=self.path,
            sha256=self.sha256,
            size=self.size,
            source_uri=source_uri,
            feature_names=list(self.feature_names) if self.feature_names is not None else None,
            feature_types=dict(self.feature_types),
            downloaded=downloaded,
        )

    def meta(self, key: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": redact(key),
            "source_uri": redact(self.source_uri),
            "model_file": self.model_file,
            "sha256": self.sha256,
            "size": self.size,
            "files": self.files,
            "feature_names": self.feature_names,
            "feature_types": self.feature_types,
            "created": time.time(),
        }

    @classmethod
    def read(cls, directory: Path) -> _Entry:
        meta_path = directory / META
        doc = json.loads(meta_path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        files = {str(k): int(v) for k, v in doc["files"].items()}
        names = doc.get("feature_names")
        return cls(
            digest=directory.name,
            dir=directory,
            model_file=str(doc["model_file"]),
            sha256=str(doc["sha256"]),
            size=int(doc["size"]),
            files=files,
            source_uri=str(doc.get("source_uri", "")),
            feature_names=[str(n) for n in names] if isinstance(names, list) else None,
            feature_types={str(k): str(v) for k, v in (doc.get("feature_types") or {}).items()},
            last_used=meta_path.stat().st_mtime,
        )


class _Flight:
    """One download in progress, shared by every load of its key."""

    def __init__(self, meter: DownloadMeter) -> None:
        self.meter = meter
        self.done = threading.Event()
        self.entry: _Entry | None = None
        self.error: LoadError | None = None


@dataclass(frozen=True)
class CacheUsage:
    entries: int
    bytes: int
    max_bytes: int
    pinned_entries: int
    pinned_bytes: int


def _verify_onnx(path: Path, where: str) -> None:
    try:
        checker.check_model(str(path))
    except checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "checker failed"
        raise InvalidModel(f"{where}: not a valid ONNX model: {first}") from None
    except Exception as exc:  # protobuf DecodeError, truncated files, ...
        raise InvalidModel(f"{where}: not a valid ONNX model ({type(exc).__name__})") from None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactCache:
    """The artifact cache of one directory; use :func:`get_cache` for the process-wide instance."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes
        self.objects = self.root / OBJECTS
        self.tmp = self.root / TMP
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pins: dict[str, int] = {}
        self._flights: dict[str, _Flight] = {}
        self._sweep_tmp()
        self._scan()

    # --- start-up -------------------------------------------------------------------------
    def _sweep_tmp(self) -> None:
        """Delete downloads left by dead processes (or by an earlier run with our pid)."""
        now = time.time()
        for child in self.tmp.iterdir():
            pid_text = child.name.split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else 0
            try:
                age = now - child.lstat().st_mtime
            except OSError:
                continue
            if pid and pid != os.getpid() and pid_alive(pid) and age < STALE_TMP_S:
                continue
            log.info("removing leftover partial download %s", child)
            self._remove(child)

    def _scan(self) -> None:
        for child in sorted(self.objects.iterdir()):
            try:
                entry = _Entry.read(child)
                if not entry.intact():
                    raise ValueError("files missing or of the wrong size")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unusable cache entry %s: %s", child.name, exc)
                self._remove(child)
                continue
            self._entries[entry.digest] = entry
        if self._entries:
            log.info(
                "artifact cache %s: %d entries, %s",
                self.root,
                len(self._entries),
                human_bytes(sum(e.size for e in self._entries.values())),
            )

    # --- helpers ---------------------------------------------------------------------------
    def _remove(self, path: Path) -> None:
        """Rename out of the way first (atomic), then delete: readers never see half a directory."""
        if not path.exists() and not path.is_symlink():
            return
        trash = self.tmp / f"{os.getpid()}-trash-{uuid.uuid4().hex}"
        try:
            path.rename(trash)
        except OSError:
            trash = path
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def _total(self) -> int:
        return sum(e.size for e in self._entries.values())

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = time.time()
        with contextlib.suppress(OSError):
            os.utime(entry.dir / META)

    def _pin_locked(self, digest: str) -> None:
        self._pins[digest] = self._pins.get(digest, 0) + 1

    def _digest_of(self, path: Path) -> str | None:
        try:
            rel = Path(path).resolve().relative_to(self.objects)
        except ValueError:
            return None
        return rel.parts[0] if rel.parts else None

    def _evict_locked(self, need: int = 0) -> list[Path]:
        """Drop unpinned entries, least recently used first, until ``need`` more bytes fit."""
        if self.max_bytes <= 0:
            return []
        doomed: list[Path] = []
        total = self._total()
        if total + need <= self.max_bytes:
            return doomed
        candidates = sorted(
            (e for e in self._entries.values() if not self._pins.get(e.digest)),
            key=lambda e: e.last_used,
        )
        for entry in candidates:
            if total + need <= self.max_bytes:
                break
            del self._entries[entry.digest]
            total -= entry.size
            trash = self.tmp / f"{os.getpid()}-evict-{entry.digest}"
            try:
                entry.dir.rename(trash)
            except OSError:
                trash = entry.dir
            doomed.append(trash)
            log.info(
                "evicting cached artifact %s (%s, %s)",
                entry.digest[:12],
                entry.source_uri,
                human_bytes(entry.size),
            )
        if total + need > self.max_bytes:
            log.warning(
                "artifact cache holds %s (+%s incoming) above its bound of %s: the rest is in use",
                human_bytes(total),
                human_bytes(need),
                human_bytes(self.max_bytes),
            )
        return doomed

    def _delete(self, paths: list[Path]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    def _lookup_locked(self, digest: str) -> _Entry | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if not entry.intact():
            log.warning("cached artifact %s was damaged on disk; fetching it again", digest[:12])
            del self._entries[digest]
            self._remove(entry.dir)
            return None
        return entry

    # --- the public API ----------------------------------------------------------------------
    def fetch(
        self,
        key: str,
        *,
        source_uri: str,
        label: str,
        expected_bytes: int,
        download: Downloader,
        progress: ProgressCallback,
        key_is_content: bool = True,
    ) -> Artifact:
        """The cached artifact for ``key``, downloading it with ``download`` on a miss.

        ``download(tmp_dir, meter)`` writes the files into ``tmp_dir`` and says which
        is the model. With ``key_is_content=False`` the key only joins concurrent
        loads; the entry is then keyed by the sha256 of what was downloaded.
        The returned artifact is pinned once (see :func:`release`).
        """
        digest = _digest(key) if key_is_content else _digest("flight:" + key)
        with self._lock:
            entry = self._lookup_locked(digest) if key_is_content else None
            if entry is not None:
                self._touch(entry)
                self._pin_locked(entry.digest)
                log.info("using cached artifact %s for %s", entry.digest[:12], redact(source_uri))
                return entry.artifact(source_uri, downloaded=False)
            flight = self._flights.get(digest)
            leader = flight is None
            if flight is None:
                flight = _Flight(DownloadMeter(label, expected_bytes))
                self._flights[digest] = flight
                doomed = self._evict_locked(expected_bytes)
            else:
                doomed = []
        self._delete(doomed)
        flight.meter.subscribe(progress)
        if leader:
            entry = self._lead(flight, digest, key, digest if key_is_content else None, source_uri, download)
            return entry.artifact(source_uri, downloaded=True)
        artifact = self._follow(flight, source_uri)
        if artifact is not None:
            return artifact
        # Evicted between the download and now (a tiny cache): fetch it again.
        return self.fetch(
            key,
            source_uri=source_uri,
            label=label,
            expected_bytes=expected_bytes,
            download=download,
            progress=progress,
            key_is_content=key_is_content,
        )

    def _follow(self, flight: _Flight, source_uri: str) -> Artifact | None:
        """Wait for the download another load of the same key leads; None if it was evicted since."""
        log.info("joining the download of %s in progress", flight.meter.label)
        flight.done.wait()
        with self._lock:
            if flight.error is not None:
                raise flight.error.copy()
            entry = flight.entry
            if entry is not None and self._entries.get(entry.digest) is entry:
                self._pin_locked(entry.digest)
                return entry.artifact(source_uri, downloaded=False)
        if entry is None:
            raise LoadError(f"the download of {flight.meter.label} was interrupted")
        return None

    def _lead(
        self,
        flight: _Flight,
        flight_key: str,
        key: str,
        digest: str | None,
        source_uri: str,
        download: Downloader,
    ) -> _Entry:
        """Download for every load waiting on ``flight``; they learn the outcome from it."""
        try:
            entry = self._download(key, digest, source_uri, flight.meter, download)
            flight.entry = entry
            return entry
        except LoadError as exc:
            log.warning("downloading %s failed (%d): %s", flight.meter.label, exc.status, exc.message)
            flight.error = exc
            raise
        except Exception as exc:
            local = local_io_error(exc, flight.meter.label)
            if local is None:
                log.exception("downloading %s failed", flight.meter.label)
                local = LoadError(f"downloading {flight.meter.label} failed: {type(exc).__name__}")
            else:
                log.error("%s", local.message)
            flight.error = local
            raise local from None
        finally:
            with self._lock:
                self._flights.pop(flight_key, None)
            flight.done.set()

    def _download(
        self, key: str, digest: str | None, source_uri: str, meter: DownloadMeter, download: Downloader
    ) -> _Entry:
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            meter.start()
            result = download(tmp, meter)
            meter.finish()
            model_path = tmp / result.model_file
            _verify_onnx(model_path, meter.label)
            for name in result.files:
                _fsync_file(tmp / name)
            sha = sha256_file(model_path)
            if digest is None:
                content = ";".join(
                    f"{name}:{sha if name == result.model_file else sha256_file(tmp / name)}"
                    for name in sorted(result.files)
                )
                digest = _digest("content:" + content)
                key = "content:" + content
            entry = _Entry(
                digest=digest,
                dir=self.objects / digest,
                model_file=result.model_file,
                sha256=sha,
                size=sum(result.files.values()),
                files=dict(result.files),
                source_uri=source_uri,
                feature_names=result.feature_names,
                feature_types=dict(result.feature_types),
                last_used=time.time(),
            )
            meta_path = tmp / META
            meta_path.write_text(json.dumps(entry.meta(key), indent=1, sort_keys=True))
            _fsync_file(meta_path)
            fsync_dir(tmp)
            return self._install(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, entry: _Entry) -> _Entry:
        """Rename the verified download into place and pin it (before any eviction runs)."""
        with self._lock:
            existing = self._lookup_locked(entry.digest)
            if existing is not None:  # same content arrived under another key
                self._touch(existing)
                self._pin_locked(existing.digest)
                return existing
            if entry.dir.exists():  # left by another process, or not in our index
                self._remove(entry.dir)
            tmp.rename(entry.dir)
            fsync_dir(self.objects)
            self._entries[entry.digest] = entry
            self._pin_locked(entry.digest)
            doomed = self._evict_locked()
        self._delete(doomed)
        log.info(
            "cached artifact %s for %s (%s)",
            entry.digest[:12],
            redact(entry.source_uri),
            human_bytes(entry.size),
        )
        return entry

    def pin(self, path: Path) -> bool:
        """Keep the entry holding ``path`` from eviction; False if it is not a cache entry."""
        with self._lock:
            digest = self._digest_of(path)
            if digest is None or digest not in self._entries:
                return False
            self._pin_locked(digest)
            return True

    def unpin(self, path: Path) -> None:
        """Drop one pin of the entry holding ``path`` (no-op for other paths)."""
        with self._lock:
            digest = self._digest_of(path)
            if digest is None or not self._pins.get(digest):
                return
            self._pins[digest] -= 1
            if not self._pins[digest]:
                del self._pins[digest]
            doomed = self._evict_locked()
        self._delete(doomed)

    def usage(self) -> CacheUsage:
        with self._lock:
            pinned = [e for e in self._entries.values() if self._pins.get(e.digest)]
            return CacheUsage(
                entries=len(self._entries),
                bytes=self._total(),
                max_bytes=self.max_bytes,
                pinned_entries=len(pinned),
                pinned_bytes=sum(e.size for e in pinned),
            )

    def evict(self) -> None:
        """Apply the size bound now (it is also applied after every download and release)."""
        with self._lock:
            doomed = self._evict_locked()
        self._delete(doomed)


_caches: dict[Path, ArtifactCache] = {}
_caches_lock = threading.Lock()


def get_cache(cache_dir: Path, max_bytes: int) -> ArtifactCache:
    """The process-wide cache of ``cache_dir`` (created, swept and scanned on first use)."""
    root = Path(cache_dir).expanduser().resolve()
    with _caches_lock:
        cache = _caches.get(root)
        if cache is None:
            cache = _caches[root] = ArtifactCache(root, max_bytes)
        cache.max_bytes = max_bytes
        return cache


def _cache_holding(path: Path) -> ArtifactCache | None:
    resolved = Path(path).resolve()
    with _caches_lock:
        caches = list(_caches.values())
    for cache in caches:
        if resolved.is_relative_to(cache.objects):
            return cache
    return None


def release(artifact: Artifact) -> None:
    """Drop the pin ``load_artifact`` put on a cached artifact (no-op for local files)."""
    cache = _cache_holding(artifact.path)
    if cache is not None:
        cache.unpin(artifact.path)


def pin(artifact: Artifact) -> bool:
    """Add a pin to a cached artifact; False when it is not (or no longer) in a cache."""
    cache = _cache_holding(artifact.path)
    return cache.pin(artifact.path) if cache is not None else False
