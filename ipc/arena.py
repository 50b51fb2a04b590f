"""Shared-memory segments and the tensor arena carved out of them.

Ownership (who may touch a slot, and when):

* A frontend process creates one arena segment at start and is its only
  allocator: ``Arena.alloc`` / ``Arena.free`` run on the frontend's event-loop
  thread, so the allocator needs no lock and no shared state.
* For one request the frontend allocates an input slot (writes the inputs) and
  an output slot (empty), then sends their descriptors to a worker. From send
  until the reply arrives, the **worker** owns both slots: it reads the inputs
  and writes the outputs. The frontend frees them only when the reply for that
  request's sequence number arrives, or when it learns that worker died. A
  request that times out keeps its slots quarantined until then, so a late
  worker never writes into memory that was handed to another request.
* When outputs do not fit the output slot, the worker writes them to a fresh
  *spill* segment and names it in the reply; ownership of the spill passes to
  the frontend with the reply, and the frontend unlinks it after reading.
* Segments are named ``msrv_<instance>_<role><pid>_<suffix>``. The coordinator
  sweeps segments of dead pids at start and every segment of its instance at
  shutdown, so none outlives the server.

Segments are opened with ``os.open`` + ``mmap`` on ``/dev/shm`` rather than
``multiprocessing.shared_memory``, whose resource tracker may unlink a segment
that another process created.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
ALIGNMENT = 64
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_OWNER = re.compile(r"^(?P<role>[a-z])(?P<pid>\d+)_")


class ArenaError(Exception):
    """Base class of arena failures."""


class ArenaFull(ArenaError):
    """No free range is large enough right now (retry later: 503)."""


class TooLarge(ArenaError):
    """The request can never fit this arena (413)."""


class SegmentError(ArenaError):
    """A segment name or range is not acceptable."""


def check_name(name: str) -> str:
    """Reject names that could point outside /dev/shm."""
    if not _NAME_OK.match(name) or name in {".", ".."}:
        raise SegmentError(f"invalid shared-memory name {name!r}")
    return name


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


class Segment:
    """One POSIX shared-memory object mapped read-write into this process."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = len(mm)
        self._mm = mm
        self.buf = memoryview(mm)
        self.owner = owner

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        check_name(name)
        free = shm_free_bytes()
        if size > free:
            raise ArenaError(
                f"/dev/shm has {free} bytes free, the arena needs {size}: give the container more "
                "(--shm-size, or an emptyDir with medium: Memory) or lower MODEL_SERVER_SHM_ARENA_BYTES"
            )
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / name)
            raise
        os.close(fd)
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        check_name(name)
        try:
            # Never follow a link planted under /dev/shm; never leak the descriptor into a child.
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SegmentError(f"shared-memory region {name!r} does not exist") from None
        except OSError as exc:
            raise SegmentError(f"shared-memory region {name!r} cannot be opened: {exc.strerror}") from None
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                raise SegmentError(f"shared-memory region {name!r} is not a regular file")
            if stat.st_size == 0:
                raise SegmentError(f"shared-memory region {name!r} is empty")
            mm = mmap.mmap(fd, stat.st_size)
        finally:
            os.close(fd)
        return cls(name, mm, owner=False)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise SegmentError(
                f"range [{offset}, {offset + nbytes}) is outside region {self.name!r} of {self.size} bytes"
            )
        return self.buf[offset : offset + nbytes]

    def close(self) -> None:
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            # A numpy view still exports the buffer; the mapping goes with the process.
            log.debug("segment %s still has views; leaving it mapped", self.name)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)


@dataclass(slots=True)
class Slot:
    """A range of an arena, owned as described in the module docstring."""

    offset: int
    size: int


class Allocator:
    """First-fit range allocator with coalescing; offsets aligned to ALIGNMENT.

    Pure bookkeeping over integers, so it can be stress-tested without memory.
    Not thread-safe by design: one thread (the frontend's event loop) owns it.
    """

    def __init__(self, size: int, alignment: int = ALIGNMENT) -> None:
        self.size = size - size % alignment
        self.alignment = alignment
        self._free_offsets: list[int] = [0]
        self._free_sizes: list[int] = [self.size]
        self._used: dict[int, int] = {}
        self.used_bytes = 0

    def alloc(self, nbytes: int) -> int:
        need = max(self.alignment, -(-nbytes // self.alignment) * self.alignment)
        if need > self.size:
            raise TooLarge(f"{nbytes} bytes can never fit the {self.size}-byte arena")
        for i, free_size in enumerate(self._free_sizes):
            if free_size >= need:
                offset = self._free_offsets[i]
                if free_size == need:
                    del self._free_offsets[i]
                    del self._free_sizes[i]
                else:
                    self._free_offsets[i] = offset + need
                    self._free_sizes[i] = free_size - need
                self._used[offset] = need
                self.used_bytes += need
                return offset
        raise ArenaFull(f"no free range of {nbytes} bytes ({self.size - self.used_bytes} free, fragmented)")

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        self.used_bytes -= size
        offsets, sizes = self._free_offsets, self._free_sizes
        i = bisect.bisect_left(offsets, offset)
        # Coalesce with the following free range.
        if i < len(offsets) and offset + size == offsets[i]:
            size += sizes[i]
            del offsets[i]
            del sizes[i]
        # Coalesce with the preceding free range.
        if i > 0 and offsets[i - 1] + sizes[i - 1] == offset:
            sizes[i - 1] += size
        else:
            offsets.insert(i, offset)
            sizes.insert(i, size)

    @property
    def live(self) -> int:
        return len(self._used)

    def largest_free(self) -> int:
        return max(self._free_sizes, default=0)


class Arena:
    """A frontend's segment plus its allocator."""

    def __init__(self, prefix: str, size: int, role: str = "f") -> None:
        name = f"{prefix}{role}{os.getpid()}_{secrets.token_hex(3)}"
        self.segment = Segment.create(name, size)
        self.allocator = Allocator(size)
        self.name = name

    def alloc(self, nbytes: int) -> Slot:
        offset = self.allocator.alloc(nbytes)
        return Slot(offset, self.allocator._used[offset])

    def free(self, slot: Slot) -> None:
        self.allocator.free(slot.offset)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.segment.view(offset, nbytes)

    def close(self) -> None:
        self.segment.close()
        self.segment.unlink()


class SegmentCache:
    """The server's own segments this process attached by name (workers: frontends' arenas).

    Names under ``trusted_prefix`` are the server's own and unique per creator (pid and a
    random suffix), so a mapping never goes stale: a restarted frontend's arena has a new
    name, and ``prune`` drops the old one. Client regions never come here: the worker's
    Engine copies them through ``ipc.client_shm``, which re-checks the file on every use.
    """

    def __init__(self, trusted_prefix: str = "msrv_") -> None:
        self._segments: dict[str, Segment] = {}
        self.trusted_prefix = trusted_prefix

    def get(self, name: str) -> Segment:
        seg = self._segments.get(name)
        if seg is None:
            seg = Segment.attach(name)
            self._segments[name] = seg
        return seg

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        return self.get(name).view(offset, nbytes)

    def adopt(self, seg: Segment) -> None:
        """Track a segment this process created (a worker's spill) under its name."""
        self._segments[seg.name] = seg

    def forget(self, name: str) -> None:
        seg = self._segments.pop(name, None)
        if seg is not None:
            seg.close()

    def prune(self) -> int:
        """Drop mappings whose object was unlinked (a frontend that restarted)."""
        gone = [name for name in self._segments if not (SHM_DIR / name).exists()]
        for name in gone:
            self.forget(name)
        return len(gone)

    def close(self) -> None:
        for name in list(self._segments):
            self.forget(name)

    def __len__(self) -> int:
        return len(self._segments)


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid encoded in a segment name of this instance, if any."""
    if not name.startswith(prefix):
        return None
    match = _OWNER.match(name[len(prefix) :])
    return int(match.group("pid")) if match else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(prefix: str, only_dead: bool = True) -> list[str]:
    """Unlink this instance's segments (of dead owners only, unless told otherwise)."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = owner_pid(name, prefix)
        if only_dead and pid is not None and pid_alive(pid):
            continue
        try:
            os.unlink(SHM_DIR / name)
            removed.append(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not remove shared memory %s: %s", name, exc)
    if removed:
        log.info("removed %d shared-memory segment(s) with prefix %s", len(removed), prefix)
    return removed


class SpillWriter:
    """Worker side: a fresh segment for outputs larger than the request's output slot."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._seq = 0

    def create(self, size: int) -> Segment:
        self._seq += 1
        name = f"{self.prefix}w{os.getpid()}_{self._seq}_{int(time.monotonic() * 1000) % 100000}"
        return Segment.create(name, max(size, ALIGNMENT))
