"""``--profile``: py-spy flame graphs of a peer's processes during one cell.

py-spy comes from ``.venv-bench`` (pinned in ``bench/requirements-mlserver.txt``). It
samples another process through ptrace (process_vm_readv); where that is forbidden
(``kernel.yama.ptrace_scope`` >= 2, containers without CAP_SYS_PTRACE) it fails to
attach and the run goes on without the profile, saying so.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from bench.venv import venv_bin

log = logging.getLogger(__name__)

RATE_HZ = 200


def py_spy() -> str | None:
    local = venv_bin("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, target: Path, duration_s: float) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        log.warning("profile: py-spy not found (pip install py-spy into .venv-bench)")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
        "--rate", str(RATE_HZ), "--format", "flamegraph", "--output", str(target), "--nonblocking",
    ]  # fmt: skip
    log.info("profile: py-spy on pid %d -> %s", pid, target)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_py_spy(proc: subprocess.Popen[bytes], target: Path) -> bool:
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    if proc.returncode != 0 or not target.exists():
        text = out.decode(errors="replace").strip()[-400:]
        log.warning("profile: py-spy failed for %s (exit %s): %s", target.name, proc.returncode, text)
        return False
    return True
