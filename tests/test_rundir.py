"""The run directory and the state file: private modes, and refusal of what is not ours."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from model_server import exitcodes
from model_server.rundir import RunDirError, prepare_run_dir, read_private, write_private

OTHER_UID = 65534  # nobody


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_0700_and_a_loose_one_of_ours_is_tightened(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "run"
    prepare_run_dir(run_dir)
    assert _mode(run_dir) == 0o700
    os.chmod(run_dir, 0o777)
    prepare_run_dir(run_dir)
    assert _mode(run_dir) == 0o700


def test_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(RunDirError, match="symlink"):
        prepare_run_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="MODEL_SERVER_RUN_DIR"):
        prepare_run_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    os.chmod(run_dir, 0o777)
    os.chown(run_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(RunDirError, match="belongs to uid 65534"):
        prepare_run_dir(run_dir)
    assert _mode(run_dir) == 0o777  # not touched


def test_state_file_is_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    old = os.umask(0)
    try:
        write_private(path, "[1]")
        write_private(path, "[2]")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and read_private(path) == "[2]"
    assert not list(tmp_path.glob("*.tmp"))
    os.chmod(path, 0o644)
    assert read_private(path) == "[2]" and _mode(path) == 0o600
    assert read_private(tmp_path / "absent.json") is None


def test_a_planted_state_file_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    (tmp_path / "state.json").symlink_to(secret)
    with pytest.raises(RunDirError):
        read_private(tmp_path / "state.json")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs.json"
        theirs.write_text("[]")
        os.chown(theirs, OTHER_UID, OTHER_UID)
        with pytest.raises(RunDirError, match="not a regular file of this user"):
            read_private(theirs)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_serve_refuses_a_run_dir_of_another_user(tmp_path: Path) -> None:
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    os.chown(run_dir, OTHER_UID, OTHER_UID)
    env = {**os.environ, "MODEL_SERVER_RUN_DIR": str(run_dir), "MODEL_SERVER_HOST": "127.0.0.1"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "model-server"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == exitcodes.BOOT_ERROR
    assert "MODEL_SERVER_RUN_DIR" in done.stderr and "belongs to uid 65534" in done.stderr
