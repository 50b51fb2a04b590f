"""Unit tests of ipc.arena: the allocator (with a seeded random stress test), segments, sweep."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.arena import (
    ALIGNMENT,
    SHM_DIR,
    Allocator,
    Arena,
    ArenaFull,
    Segment,
    SegmentCache,
    SegmentError,
    SpillWriter,
    TooLarge,
    check_name,
    owner_pid,
    sweep,
)

KiB = 1024


@pytest.fixture
def prefix() -> Iterator[str]:
    """A shared-memory prefix unique to this test process; everything under it is removed after."""
    pre = f"msrv_unit{os.getpid()}_arena_"
    try:
        yield pre
    finally:
        sweep(pre, only_dead=False)
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(pre)]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(proc.stdout)


# ----------------------------------------------------------------------------- Allocator


def test_alloc_aligns_and_rounds_up() -> None:
    alloc = Allocator(4 * KiB)
    a = alloc.alloc(1)
    b = alloc.alloc(65)
    c = alloc.alloc(0)
    assert (a, b, c) == (0, 64, 192)
    assert alloc.used_bytes == 64 + 128 + 64
    assert alloc.live == 3
    assert all(off % ALIGNMENT == 0 for off in (a, b, c))


def test_size_is_truncated_to_alignment() -> None:
    alloc = Allocator(1000)
    assert alloc.size == 960
    assert alloc.largest_free() == 960
    with pytest.raises(TooLarge):
        alloc.alloc(961)
    assert alloc.alloc(960) == 0


def test_free_then_reuse_first_fit() -> None:
    alloc = Allocator(1024)
    offsets = [alloc.alloc(64) for _ in range(4)]
    assert offsets == [0, 64, 128, 192]
    alloc.free(64)
    # First fit: the hole left at 64 is reused before the untouched tail.
    assert alloc.alloc(10) == 64
    alloc.free(0)
    alloc.free(64)
    # The two adjacent holes coalesced: a 128-byte request fits at 0.
    assert alloc.alloc(128) == 0


def test_exhaustion_raises_arena_full_and_recovers() -> None:
    alloc = Allocator(512)
    offsets = [alloc.alloc(64) for _ in range(8)]
    assert alloc.used_bytes == 512
    assert alloc.largest_free() == 0
    with pytest.raises(ArenaFull):
        alloc.alloc(1)
    alloc.free(offsets[3])
    assert alloc.alloc(64) == offsets[3]


def test_fragmentation_is_arena_full_not_too_large() -> None:
    alloc = Allocator(512)
    offsets = [alloc.alloc(64) for _ in range(8)]
    for off in offsets[::2]:
        alloc.free(off)
    assert alloc.used_bytes == 256
    # 256 bytes are free but no 128-byte range: retryable, not "never fits".
    with pytest.raises(ArenaFull):
        alloc.alloc(128)
    with pytest.raises(TooLarge):
        alloc.alloc(513)


def test_free_unknown_or_twice_raises() -> None:
    alloc = Allocator(512)
    off = alloc.alloc(64)
    alloc.free(off)
    with pytest.raises(KeyError):
        alloc.free(off)
    with pytest.raises(KeyError):
        alloc.free(128)
    assert alloc.used_bytes == 0


def _free_ranges(alloc: Allocator) -> list[tuple[int, int]]:
    return list(zip(alloc._free_offsets, alloc._free_sizes, strict=True))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=64, max_value=64 * KiB),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=8 * KiB), st.integers(0, 10**6)),
        min_size=1,
        max_size=120,
    ),
)
def test_allocator_random_stress(size: int, ops: list[tuple[bool, int, int]]) -> None:
    """Random alloc/free: live ranges never overlap, stay aligned and in bounds; freeing all coalesces."""
    alloc = Allocator(size)
    live: dict[int, int] = {}  # offset -> requested bytes
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            need = max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)
            try:
                off = alloc.alloc(nbytes)
            except TooLarge:
                assert need > alloc.size
                continue
            except ArenaFull:
                assert need <= alloc.size
                assert alloc.largest_free() < need
                continue
            assert off % ALIGNMENT == 0
            assert off >= 0 and off + need <= alloc.size
            live[off] = need
        else:
            off = sorted(live)[pick % len(live)]
            alloc.free(off)
            del live[off]
        # Invariants after every step.
        spans = sorted(live.items())
        for (a_off, a_size), (b_off, _) in itertools.pairwise(spans):
            assert a_off + a_size <= b_off, "live ranges overlap"
        free = _free_ranges(alloc)
        assert alloc.used_bytes == sum(live.values())
        assert alloc.used_bytes + sum(s for _, s in free) == alloc.size, "bytes lost or double counted"
        for (f_off, f_size), (g_off, _) in itertools.pairwise(free):
            assert f_off + f_size < g_off, "free list unsorted, overlapping or not coalesced"
        for f_off, f_size in free:
            assert f_size > 0
            for l_off, l_size in live.items():
                assert f_off + f_size <= l_off or l_off + l_size <= f_off, "free range overlaps a live one"
    for off in list(live):
        alloc.free(off)
    assert alloc.used_bytes == 0
    assert alloc.live == 0
    assert _free_ranges(alloc) == [(0, alloc.size)]


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", ".", "x" * 201, "a b", "a\x00b"])
def test_check_name_rejects(bad: str) -> None:
    with pytest.raises(SegmentError):
        check_name(bad)


@pytest.mark.parametrize("good", ["msrv_ab12_f123_0a1b2c", "a", "x.y-z_1", "x" * 200])
def test_check_name_accepts(good: str) -> None:
    assert check_name(good) == good


def test_attach_rejects_bad_names_before_touching_the_filesystem() -> None:
    with pytest.raises(SegmentError):
        Segment.attach("../etc/passwd")
    with pytest.raises(SegmentError):
        Segment.create("a/b", 64)


def test_owner_pid() -> None:
    assert owner_pid("msrv_i_f123_abc", "msrv_i_") == 123
    assert owner_pid("msrv_i_w77_1_500", "msrv_i_") == 77
    assert owner_pid("msrv_j_f123_abc", "msrv_i_") is None
    assert owner_pid("msrv_i_client", "msrv_i_") is None
    assert owner_pid("msrv_i_F1_x", "msrv_i_") is None


# ----------------------------------------------------------------------------- segments


def test_arena_name_alloc_write_read(prefix: str) -> None:
    arena = Arena(prefix, 64 * KiB)
    try:
        assert arena.name.startswith(f"{prefix}f{os.getpid()}_")
        assert owner_pid(arena.name, prefix) == os.getpid()
        assert (SHM_DIR / arena.name).stat().st_size == 64 * KiB
        slot = arena.alloc(100)
        assert (slot.offset, slot.size) == (0, 128)
        data = np.arange(25, dtype=np.float32)
        np.frombuffer(arena.view(slot.offset, 100), np.float32).reshape(5, 5)[:] = data.reshape(5, 5)
        assert bytes(arena.view(slot.offset, 100)) == data.tobytes()
        other = Segment.attach(arena.name)
        try:
            assert not other.owner
            assert other.size == 64 * KiB
            got = np.frombuffer(other.view(slot.offset, 100), np.float32).copy()
            np.testing.assert_array_equal(got, data)
        finally:
            other.close()
        arena.free(slot)
        assert arena.allocator.used_bytes == 0
    finally:
        arena.close()
    assert not (SHM_DIR / arena.name).exists()


def test_segment_bounds_are_checked(prefix: str) -> None:
    seg = Segment.create(f"{prefix}bounds", 256)
    try:
        assert seg.owner
        assert len(seg.view(0, 256)) == 256
        assert len(seg.view(256, 0)) == 0
        for offset, nbytes in [(0, 257), (255, 2), (-1, 1), (0, -1)]:
            with pytest.raises(SegmentError):
                seg.view(offset, nbytes)
        assert len(seg.view(128, 128)) == 128
    finally:
        seg.close()
        seg.unlink()


def test_create_is_exclusive_and_attach_needs_existing(prefix: str) -> None:
    seg = Segment.create(f"{prefix}excl", 128)
    try:
        with pytest.raises(FileExistsError):
            Segment.create(f"{prefix}excl", 128)
    finally:
        seg.close()
        seg.unlink()
    with pytest.raises(SegmentError, match="does not exist"):
        Segment.attach(f"{prefix}excl")
    # Unlinking twice is harmless.
    seg.unlink()


def test_attach_empty_object_is_an_error(prefix: str) -> None:
    path = SHM_DIR / f"{prefix}empty"
    path.touch()
    with pytest.raises(SegmentError, match="empty"):
        Segment.attach(path.name)


def test_close_with_live_numpy_view_does_not_raise(prefix: str) -> None:
    arena = Arena(prefix, 4 * KiB)
    view = np.frombuffer(arena.view(0, 16), np.int32)
    view[:] = [1, 2, 3, 4]
    arena.close()  # logs and leaves the mapping; must still unlink
    assert not (SHM_DIR / arena.name).exists()
    assert view.tolist() == [1, 2, 3, 4]


# Runs in a spawned process through ``exec`` (a builtin, so the child does not import this
# test module with pytest and hypothesis): read what the parent wrote, write back its square.
_CHILD = """
import sys
import numpy as np
from ipc.arena import SHM_DIR, Segment

seg = Segment.attach(NAME)
arr = np.frombuffer(seg.view(OFFSET, COUNT * 8), np.int64)
if arr.tolist() != list(range(COUNT)):
    sys.exit(2)
arr[:] = arr * arr
del arr
seg.close()
# The child did not create the segment and must not remove it on exit.
sys.exit(0 if (SHM_DIR / NAME).exists() else 3)
"""


def test_attach_from_another_process(prefix: str) -> None:
    arena = Arena(prefix, 64 * KiB)
    try:
        slot = arena.alloc(8 * 100)
        np.frombuffer(arena.view(slot.offset, 800), np.int64)[:] = np.arange(100)
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=exec, args=(_CHILD, {"NAME": arena.name, "OFFSET": slot.offset, "COUNT": 100})
        )
        proc.start()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
            pytest.fail("child did not finish in 30 s")
        assert proc.exitcode == 0
        got = np.frombuffer(arena.view(slot.offset, 800), np.int64).copy()
        np.testing.assert_array_equal(got, np.arange(100) ** 2)
        assert (SHM_DIR / arena.name).exists()
    finally:
        arena.close()


def test_segment_cache_attaches_once_and_prunes_unlinked(prefix: str) -> None:
    seg = Segment.create(f"{prefix}c_{os.getpid()}", 128)
    cache = SegmentCache()
    try:
        first = cache.get(seg.name)
        assert cache.get(seg.name) is first
        assert len(cache) == 1
        cache.view(seg.name, 0, 4)[:] = b"abcd"
        assert bytes(seg.view(0, 4)) == b"abcd"
        with pytest.raises(SegmentError):
            cache.view(seg.name, 100, 64)
        seg.unlink()
        assert cache.prune() == 1
        assert len(cache) == 0
    finally:
        cache.close()
        seg.close()
        seg.unlink()


def test_spill_writer_names_and_sizes(prefix: str) -> None:
    spill = SpillWriter(prefix)
    a = spill.create(10)
    b = spill.create(1000)
    try:
        assert a.name != b.name
        assert a.size == ALIGNMENT
        assert b.size == 1000
        assert owner_pid(a.name, prefix) == os.getpid()
        assert a.name.startswith(f"{prefix}w{os.getpid()}_1_")
        assert b.name.startswith(f"{prefix}w{os.getpid()}_2_")
    finally:
        for seg in (a, b):
            seg.close()
            seg.unlink()


# ----------------------------------------------------------------------------- sweep


def test_sweep_removes_dead_owners_and_keeps_live(prefix: str) -> None:
    dead = _dead_pid()
    live_seg = Segment.create(f"{prefix}f{os.getpid()}_live", 64)
    dead_seg = Segment.create(f"{prefix}f{dead}_dead", 64)
    dead_spill = Segment.create(f"{prefix}w{dead}_1_2", 64)
    # Another instance's segment of a dead owner: not ours to remove.
    other = Segment.create(f"msrv_unit{os.getpid()}_other_f{dead}_x", 64)
    try:
        removed = sweep(prefix)
        assert sorted(removed) == sorted([dead_seg.name, dead_spill.name])
        assert (SHM_DIR / live_seg.name).exists()
        assert not (SHM_DIR / dead_seg.name).exists()
        assert (SHM_DIR / other.name).exists()
        # Shutdown sweep: every segment of the instance, live owner or not, but only this prefix.
        assert sweep(prefix, only_dead=False) == [live_seg.name]
        assert not (SHM_DIR / live_seg.name).exists()
        assert (SHM_DIR / other.name).exists()
        assert sweep(prefix) == []
    finally:
        for seg in (live_seg, dead_seg, dead_spill, other):
            seg.close()
            seg.unlink()
