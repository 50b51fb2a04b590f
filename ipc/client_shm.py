"""Clients' system shared-memory regions (V2 extension), read and written without mapping them.

A client owns its region: it can truncate it, replace it by a directory or a
symlink, or re-create it at any time. A memory map of a file someone else
truncates raises SIGBUS on the next access, which kills the process; following
a symlink would let a client aim the server at any file its user can write.
So a region is never mapped here. Every use opens it afresh with
``O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK``, checks with ``fstat`` that it is a
regular file owned by this process's user and long enough for the range, and
copies through ``os.preadv`` / ``os.pwrite``: a region truncated after the
check yields a short read (an error reply), never a signal. The cost is one
copy per tensor (see ``bench/client_shm_copy.py`` for the numbers).

The server's own segments (arenas, spills) are mapped as before: nobody but
the server creates or resizes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from .arena import SHM_DIR, SegmentError

_KEY_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Linux caps one read/write call at this many bytes; larger copies loop.
_IO_CHUNK = 0x7FFFF000
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class RegionError(SegmentError):
    """A client's region cannot be used as asked (missing, not a regular file, too short): 400."""


def object_name(key: str, max_length: int) -> str:
    """The /dev/shm object name of a client's key (``/name`` or ``name``), or RegionError.

    Only a plain name directly under /dev/shm: no '/' after the leading one, no '..'.
    """
    name = key[1:] if key.startswith("/") else key
    if not name or len(name) > max_length:
        raise RegionError(f"shared memory key must be 1 to {max_length} characters")
    if not _KEY_OK.match(name) or ".." in name or name == ".":
        raise RegionError(
            f"invalid shared memory key {key!r}: a plain name directly under /dev/shm is required"
        )
    return name


@contextlib.contextmanager
def opened(name: str, offset: int, nbytes: int) -> Iterator[int]:
    """A descriptor of region ``name`` once it is checked to hold ``[offset, offset + nbytes)``."""
    if offset < 0 or nbytes < 0:
        raise RegionError(f"range [{offset}, {offset + nbytes}) of shared memory region {name!r} is invalid")
    try:
        fd = os.open(SHM_DIR / name, _OPEN_FLAGS)
    except FileNotFoundError:
        raise RegionError(f"shared memory object {name!r} does not exist") from None
    except OSError as exc:
        # ELOOP: a symlink; EISDIR: a directory; EACCES: not ours to open.
        raise RegionError(f"shared memory object {name!r} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RegionError(f"shared memory object {name!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RegionError(f"shared memory object {name!r} is not owned by the server's user")
        if offset + nbytes > st.st_size:
            raise RegionError(
                f"offset {offset} + size {nbytes} exceeds shared memory object {name!r} of {st.st_size} bytes"
            )
        yield fd
    finally:
        os.close(fd)


def check(name: str, offset: int, nbytes: int) -> None:
    """Raise RegionError unless region ``name`` is usable for ``[offset, offset + nbytes)``."""
    with opened(name, offset, nbytes):
        pass


def read(name: str, offset: int, nbytes: int) -> npt.NDArray[np.uint8]:
    """A private copy of ``nbytes`` at ``offset`` of region ``name`` (64-byte aligned memory)."""
    with opened(name, offset, nbytes) as fd:
        # Allocated once the file is known to hold the range; over-allocated to hand
        # ONNX Runtime an aligned buffer whatever the element type.
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        start = (-raw.ctypes.data) % 64
        out = raw[start : start + nbytes]
        done = 0
        view = out.data
        while done < nbytes:
            try:
                got = os.preadv(fd, [view[done : done + _IO_CHUNK]], offset + done)
            except OSError as exc:
                raise RegionError(f"shared memory object {name!r} cannot be read: {exc.strerror}") from None
            if got <= 0:
                # Truncated between the fstat and the read.
                raise RegionError(f"shared memory object {name!r} shrank while it was read")
            done += got
    return out


def write(name: str, offset: int, data: memoryview) -> None:
    """Copy ``data`` (flat bytes) to ``offset`` of region ``name``."""
    nbytes = data.nbytes
    with opened(name, offset, nbytes) as fd:
        done = 0
        while done < nbytes:
            try:
                wrote = os.pwrite(fd, data[done : done + _IO_CHUNK], offset + done)
            except OSError as exc:  # ENOSPC: a sparse region whose pages /dev/shm cannot back
                raise RegionError(
                    f"shared memory object {name!r} cannot be written: {exc.strerror}"
                ) from None
            if wrote <= 0:
                raise RegionError(f"shared memory object {name!r} cannot be written")
            done += wrote
