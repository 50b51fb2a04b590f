"""Run a snippet in a fresh Python process writing to a prometheus-client multiprocess
directory: how the tests stand in for several frontend processes sharing one metrics dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_with_metrics_dir(code: str, cwd: Path, directory: Path, *args: str) -> str:
    """What ``code`` (given ``args`` as ``sys.argv[1:]``) prints; it must exit 0."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
