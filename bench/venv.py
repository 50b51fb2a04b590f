"""The benchmark's own virtualenvs for the peers that cannot share ``.venv``, created on first use.

- ``.venv-bench``: MLServer 1.7.1, which needs fastapi < 0.116 while the project locks a newer one.
- ``.venv-pytriton``: PyTriton 0.7 (it ships the real ``tritonserver`` and its Python
  backend stub). The stub links the *system* ``libpython3.11``, so this venv is made from
  the system interpreter (:func:`system_python311`), not the one the project venv uses.
- ``.venv-litserve``: LitServe 0.2.19 with its ZeroMQ queue.

Each is built from exact pins in ``bench/requirements-<name>.txt``; a stamp file holding
the hash of that file makes a later run reuse it, and a changed pin list rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REQUIREMENTS = BENCH_DIR / "requirements-mlserver.txt"
VENV_DIR = REPO_ROOT / ".venv-bench"
STAMP = ".bench-installed"
SYSTEM_PYTHON311 = ("/usr/bin/python3.11", "/usr/local/bin/python3.11")


class VenvUnavailable(RuntimeError):
    """A peer's virtualenv cannot be built here (no suitable interpreter, no registry)."""


@dataclass(frozen=True)
class PeerVenv:
    """One peer's virtualenv: where, from which pins, and the file that proves it is installed."""

    name: str
    venv: Path
    requirements: Path
    marker: str  # a file under bin/ that exists once the peer is installed
    system_python: bool = False  # build from the system interpreter (libpython3.11 ABI)


MLSERVER = PeerVenv("mlserver", VENV_DIR, REQUIREMENTS, "mlserver")
PYTRITON = PeerVenv(
    "pytriton", REPO_ROOT / ".venv-pytriton", BENCH_DIR / "requirements-pytriton.txt", "python", True
)
LITSERVE = PeerVenv(
    "litserve", REPO_ROOT / ".venv-litserve", BENCH_DIR / "requirements-litserve.txt", "python"
)


def requirements_hash(path: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def venv_bin(name: str, venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / name


def is_current(venv: Path = VENV_DIR, requirements: Path = REQUIREMENTS, marker: str = "mlserver") -> bool:
    stamp = venv / STAMP
    return (
        venv_bin(marker, venv).exists()
        and stamp.exists()
        and stamp.read_text().strip() == requirements_hash(requirements)
    )


def base_python() -> str:
    """A plain interpreter to create the venv from (not the project venv's python)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(base)


def system_python311(candidates: tuple[str, ...] = SYSTEM_PYTHON311) -> str:
    """The distribution's Python 3.11, whose ``libpython3.11`` Triton's Python backend stub loads."""
    for candidate in candidates:
        if Path(candidate).exists():
            return candidate
    raise VenvUnavailable(
        f"no system Python 3.11 at {', '.join(candidates)}: PyTriton's backend stub links the system "
        "libpython3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv libpython3.11)"
    )


def ensure_venv(spec: PeerVenv) -> Path:
    """Create or refresh ``spec``'s venv; return its python. Needs PyPI the first time."""
    venv, requirements = spec.venv, spec.requirements
    if is_current(venv, requirements, spec.marker):
        return venv_bin("python", venv)
    if venv.exists():
        log.info("rebuilding %s: %s changed", venv, requirements.name)
        shutil.rmtree(venv)
    python = system_python311() if spec.system_python else base_python()
    log.info("creating %s from %s and %s (takes a minute or more)", venv, python, requirements.name)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_bin("python", venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    (venv / STAMP).write_text(requirements_hash(requirements) + "\n")
    return venv_bin("python", venv)


def ensure_mlserver_venv(venv: Path = VENV_DIR, requirements: Path = REQUIREMENTS) -> Path:
    """Create or refresh ``.venv-bench``; return its python."""
    return ensure_venv(PeerVenv("mlserver", venv, requirements, "mlserver"))


def package_version(python: Path, package: str) -> str:
    """Version of ``package`` as installed in another interpreter's environment."""
    code = f"from importlib.metadata import version; print(version({package!r}))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
