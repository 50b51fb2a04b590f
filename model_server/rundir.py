"""The run directory and the private files in it (sockets, the coordinator's state file).

The run directory holds the control sockets (anyone who can connect can load and
unload models) and ``coordinator-state.json`` (the model table's URIs), so it is
created ``0700`` and its files ``0600``. The default lives in the shared ``/tmp``,
where another user could create it first and wait: a directory that is not ours,
or is a symlink, is refused with a clear error. One that is ours but readable by
others (made by an older version, or by hand) is tightened to ``0700``, since
refusing would only make upgrades fail and the owner could always do the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


class RunDirError(Exception):
    """The run directory (or a file in it) is not safely ours; the message says what to do."""


def prepare_run_dir(path: Path) -> None:
    """Create ``path`` 0700, or check that an existing one is ours (mode fixed to 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RunDirError(
            f"run directory {path} is a symlink or not a directory; remove it or set MODEL_SERVER_RUN_DIR"
        )
    if info.st_uid != os.geteuid():
        raise RunDirError(
            f"run directory {path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}); "
            "someone else created it: remove it or set MODEL_SERVER_RUN_DIR to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) != DIR_MODE:
        log.warning("run directory %s had mode %o; set to %o", path, stat.S_IMODE(info.st_mode), DIR_MODE)
        os.chmod(path, DIR_MODE)


def write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, readable by the owner only (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_private(path: Path) -> str | None:
    """The text of ``path`` if it is a regular file of ours (mode tightened to 0600); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink planted in its place
        raise RunDirError(f"{path} is not a regular file ({exc.strerror}); remove it") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise RunDirError(f"{path} is not a regular file of this user; remove it")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(os.dup(fd), "r") as f:
            return f.read()
    finally:
        os.close(fd)
