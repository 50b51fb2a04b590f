"""The artifact cache on its own: verification, eviction, pins, restarts, leftovers (no services)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loader.artifact import Artifact
from loader.cache import META, ArtifactCache
from loader.errors import InsufficientStorage, InvalidModel, LoadError, SourceUnavailable
from loader.progress import DownloadMeter
from loader.remote import Downloaded

from .builders import assert_same_outputs, dense_model

pytestmark = pytest.mark.timeout(60)

MODEL = dense_model(width=8)
MODEL_B = dense_model(width=8, seed=1)


def writer(
    content: bytes = MODEL.reference, calls: list[str] | None = None
) -> Callable[[Path, DownloadMeter], Downloaded]:
    def download(tmp: Path, meter: DownloadMeter) -> Downloaded:
        if calls is not None:
            calls.append(str(tmp))
        (tmp / "model.onnx").write_bytes(content)
        meter.advance(len(content))
        return Downloaded(model_file="model.onnx", files={"model.onnx": len(content)})

    return download


def fetch(
    cache: ArtifactCache,
    key: str,
    download: Callable[[Path, DownloadMeter], Downloaded],
    key_is_content: bool = True,
) -> Artifact:
    return cache.fetch(
        key,
        source_uri=f"test://{key}",
        label=key,
        expected_bytes=len(MODEL.reference),
        download=download,
        progress=lambda _: None,
        key_is_content=key_is_content,
    )


def test_download_is_verified_and_reused(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    calls: list[str] = []
    first = fetch(cache, "a", writer(calls=calls))
    assert first.downloaded and first.path.is_file()
    assert_same_outputs(first.path, MODEL)
    meta = json.loads((first.path.parent / META).read_text())
    assert meta["sha256"] == first.sha256 and meta["files"] == {"model.onnx": first.size}
    second = fetch(cache, "a", writer(calls=calls))
    assert not second.downloaded and second.path == first.path
    assert len(calls) == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    first = fetch(ArtifactCache(tmp_path), "a", writer())

    def must_not_download(tmp: Path, meter: DownloadMeter) -> Downloaded:
        raise AssertionError("the restarted cache should have found the entry")

    again = fetch(ArtifactCache(tmp_path), "a", must_not_download)
    assert again.path == first.path and not again.downloaded


@pytest.mark.parametrize(
    ("content", "error"),
    [(b"not onnx at all", InvalidModel), (MODEL.reference[: len(MODEL.reference) // 2], InvalidModel)],
)
def test_invalid_download_leaves_nothing(tmp_path: Path, content: bytes, error: type[LoadError]) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(error):
        fetch(cache, "bad", writer(content))
    assert list((tmp_path / "objects").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_failure_mid_download_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path, meter: DownloadMeter) -> Downloaded:
        (tmp / "model.onnx").write_bytes(MODEL.reference[:100])
        raise SourceUnavailable("connection reset in the middle")

    cache = ArtifactCache(tmp_path)
    with pytest.raises(SourceUnavailable):
        fetch(cache, "a", broken)
    assert list((tmp_path / "objects").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert fetch(cache, "a", writer()).downloaded  # the next load starts afresh


def test_unexpected_errors_become_load_errors(tmp_path: Path) -> None:
    def buggy(tmp: Path, meter: DownloadMeter) -> Downloaded:
        raise KeyError("oops")

    with pytest.raises(LoadError, match="KeyError"):
        fetch(ArtifactCache(tmp_path), "a", buggy)


def test_leftovers_of_a_crash_are_swept(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    good = fetch(cache, "a", writer())
    dead = tmp_path / "tmp" / "999999999-partial"  # no such pid
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half")
    mine = tmp_path / "tmp" / f"{os.getpid()}-earlier-run"
    mine.mkdir()
    no_meta = tmp_path / "objects" / ("f" * 64)
    no_meta.mkdir()
    (no_meta / "model.onnx").write_bytes(MODEL.reference)
    damaged = fetch(cache, "b", writer(MODEL_B.reference))
    with open(damaged.path, "r+b") as fh:
        fh.truncate(10)

    reopened = ArtifactCache(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "objects").iterdir()) == [good.path.parent.name]
    assert reopened.usage().entries == 1


def test_damaged_entry_is_fetched_again(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    first = fetch(cache, "a", writer())
    first.path.write_bytes(b"x")
    again = fetch(cache, "a", writer())
    assert again.downloaded
    assert_same_outputs(again.path, MODEL)


def test_lru_eviction_spares_pinned_entries(tmp_path: Path) -> None:
    size = len(MODEL.reference)
    cache = ArtifactCache(tmp_path, max_bytes=int(2.5 * size))
    a = fetch(cache, "a", writer())
    b = fetch(cache, "b", writer(MODEL_B.reference))
    cache.unpin(a.path)  # a is unused now; b stays pinned
    c = fetch(cache, "c", writer(dense_model(width=8, seed=2).reference))
    assert not a.path.exists(), "the unused entry made room"
    assert b.path.exists() and c.path.exists()
    usage = cache.usage()
    assert (usage.entries, usage.pinned_entries) == (2, 2)
    assert usage.bytes <= usage.max_bytes

    # Everything pinned: the bound is exceeded rather than a model in use lost.
    d = fetch(cache, "d", writer(dense_model(width=8, seed=3).reference))
    assert b.path.exists() and c.path.exists() and d.path.exists()
    for artifact in (b, c, d):
        cache.unpin(artifact.path)
    cache.evict()
    assert cache.usage().bytes <= cache.max_bytes
    assert d.path.exists(), "the most recently used entry stays"


def test_least_recently_used_goes_first(tmp_path: Path) -> None:
    size = len(MODEL.reference)
    cache = ArtifactCache(tmp_path, max_bytes=int(2.5 * size))
    a = fetch(cache, "a", writer())
    b = fetch(cache, "b", writer(MODEL_B.reference))
    cache.unpin(a.path)
    cache.unpin(b.path)
    os.utime(a.path.parent / META, (1, 1))
    os.utime(b.path.parent / META, (2, 2))
    # Restart: the order comes from disk; then a is used again.
    cache = ArtifactCache(tmp_path, max_bytes=int(2.5 * size))
    cache.unpin(fetch(cache, "a", writer()).path)
    cache.unpin(fetch(cache, "c", writer(dense_model(width=8, seed=2).reference)).path)
    assert a.path.exists() and not b.path.exists()


def test_concurrent_fetches_share_the_download_and_its_error(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    started, proceed = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_failure(tmp: Path, meter: DownloadMeter) -> Downloaded:
        calls.append("x")
        started.set()
        proceed.wait(10)
        raise SourceUnavailable("store went away")

    errors: list[BaseException] = []

    def load() -> None:
        try:
            fetch(cache, "k", slow_failure)
        except LoadError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    threads[0].start()
    assert started.wait(10)
    for thread in threads[1:]:
        thread.start()
    (flight,) = cache._flights.values()
    deadline = time.monotonic() + 10
    while len(flight.meter._subscribers) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # until every load has joined the download in flight
    proceed.set()
    for thread in threads:
        thread.join(10)
    assert calls == ["x"]
    assert len(errors) == 4 and all(isinstance(e, SourceUnavailable) for e in errors)
    assert len({id(e) for e in errors}) == 4, "each waiter gets its own exception object"


def test_content_keyed_entries_are_deduplicated(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    one = fetch(cache, "gs://a/model", writer(), key_is_content=False)
    two = fetch(cache, "gs://b/copy", writer(), key_is_content=False)
    assert one.path == two.path
    assert cache.usage().entries == 1


def test_full_disk_is_507_and_leaves_nothing(tmp_path: Path) -> None:
    def disk_full(tmp: Path, meter: DownloadMeter) -> Downloaded:
        (tmp / "model.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InsufficientStorage) as info:
        fetch(ArtifactCache(tmp_path), "a", disk_full)
    assert info.value.status == 507
    assert list((tmp_path / "tmp").iterdir()) == []
