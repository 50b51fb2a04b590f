"""The benchmark's own virtualenv for MLServer (``.venv-bench``), created on first use.

MLServer 1.7.1 needs fastapi < 0.116 while the project locks a newer one, so MLServer
cannot share ``.venv``. The environment is built from the exact pins in
``bench/requirements-mlserver.txt``; a stamp file holding the hash of that file makes
a later run reuse it, and a changed pin list rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REQUIREMENTS = BENCH_DIR / "requirements-mlserver.txt"
VENV_DIR = REPO_ROOT / ".venv-bench"
STAMP = ".bench-installed"


def requirements_hash(path: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def venv_bin(name: str, venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / name


def is_current(venv: Path = VENV_DIR, requirements: Path = REQUIREMENTS) -> bool:
    stamp = venv / STAMP
    return (
        venv_bin("mlserver", venv).exists()
        and stamp.exists()
        and stamp.read_text().strip() == requirements_hash(requirements)
    )


def base_python() -> str:
    """A plain interpreter to create the venv from (not the project venv's python)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(base)


def ensure_mlserver_venv(venv: Path = VENV_DIR, requirements: Path = REQUIREMENTS) -> Path:
    """Create or refresh ``.venv-bench``; return its python. Needs PyPI the first time."""
    if is_current(venv, requirements):
        return venv_bin("python", venv)
    if venv.exists():
        log.info("rebuilding %s: %s changed", venv, requirements.name)
        shutil.rmtree(venv)
    log.info("creating %s (MLServer and onnxruntime from %s; takes a minute)", venv, requirements.name)
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    pip = [str(venv_bin("python", venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    (venv / STAMP).write_text(requirements_hash(requirements) + "\n")
    return venv_bin("python", venv)


def package_version(python: Path, package: str) -> str:
    """Version of ``package`` as installed in another interpreter's environment."""
    code = f"from importlib.metadata import version; print(version({package!r}))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
