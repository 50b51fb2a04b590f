"""wrk as the one HTTP load generator: run it, parse what it prints.

wrk is a closed-loop generator: ``-c`` connections each keep one request in flight,
so concurrency == connections; threads = min(2, concurrency) on the 2-core machine.
``bench/wrk/post.lua`` sends a fixed body from a file and prints a ``BENCH_JSON``
summary line (exact microsecond percentiles); the human-readable ``--latency`` text
is parsed as a fallback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from bench.payloads import Payload
from bench.stats import Rep

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "post.lua"
INSTALL_HINT = (
    "wrk is not installed. Install it from Debian/Ubuntu packages:\n"
    "    sudo apt-get install -y wrk\n"
    "(macOS: brew install wrk)"
)


class WrkError(RuntimeError):
    pass


def wrk_path() -> str | None:
    return shutil.which("wrk")


def tool_version(name: str, pattern: str) -> str:
    """What a load generator's ``--version`` says (``pattern``'s group 1), for the report."""
    exe = shutil.which(name)
    if exe is None:
        return "not installed"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def wrk_version() -> str:
    return tool_version("wrk", r"wrk\s+(\S+)")


def wrk_threads(concurrency: int, max_threads: int = 2) -> int:
    return max(1, min(max_threads, concurrency))


def wrk_command(
    base_url: str, payload: Payload, concurrency: int, duration_s: float, timeout_s: float
) -> list[str]:
    exe = wrk_path() or "wrk"
    args = [
        exe,
        f"-t{wrk_threads(concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        base_url.rstrip("/") + payload.endpoint,
        "--",
        str(payload.body_file),
        payload.content_type,
    ]
    if payload.header_length is not None:
        args.append(str(payload.header_length))
    return args


def run_wrk(base_url: str, payload: Payload, concurrency: int, duration_s: float, timeout_s: float) -> Rep:
    command = wrk_command(base_url, payload, concurrency, duration_s, timeout_s)
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=duration_s + timeout_s + 30
    )
    if result.returncode != 0:
        raise WrkError(f"wrk exited {result.returncode}: {result.stderr.strip()[:500]}")
    return parse_wrk_output(result.stdout)


# --- parsing ----------------------------------------------------------------------------

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def _count(value: str) -> float:
    """wrk's scaled counts: ``1.06k``, ``2.30M``."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    if value and value[-1] in scale:
        return float(value[:-1]) * scale[value[-1]]
    return float(value)


def parse_wrk_output(text: str) -> Rep:
    """Parse wrk's output: the BENCH_JSON line when present, else the ``--latency`` text."""
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            return _from_json_line(json.loads(line[len("BENCH_JSON ") :]))
    return _from_text(text)


def _from_json_line(data: dict[str, float]) -> Rep:
    detail = {key: int(data[key]) for key in ("connect", "read", "write", "timeout", "status")}
    return Rep(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        mean_ms=data["mean_us"] / 1e3,
        max_ms=data["max_us"] / 1e3,
        errors=sum(detail.values()),
        error_detail=detail,
    )


def _from_text(text: str) -> Rep:
    total = re.search(r"(\d+) requests in " + _TIME, text)
    if total is None:
        raise WrkError(f"cannot parse wrk output:\n{text[-800:]}")
    requests = int(total.group(1))
    duration_s = _to_ms(total.group(2), total.group(3)) / 1e3
    percentiles: dict[int, float] = {}
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+" + _TIME, text, flags=re.MULTILINE):
        percentiles[int(pct)] = _to_ms(value, unit)
    latency = re.search(r"Latency\s+" + _TIME + r"\s+\S+\s+" + _TIME, text)
    detail = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket:
        for key, value in zip(("connect", "read", "write", "timeout"), socket.groups(), strict=True):
            detail[key] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        detail["status"] = int(non2xx.group(1))
    return Rep(
        requests=requests,
        duration_s=duration_s,
        p50_ms=percentiles.get(50, float("nan")),
        p90_ms=percentiles.get(90, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
        mean_ms=_to_ms(latency.group(1), latency.group(2)) if latency else float("nan"),
        max_ms=_to_ms(latency.group(3), latency.group(4)) if latency else float("nan"),
        errors=sum(detail.values()),
        error_detail=detail,
    )


def requests_per_second_line(text: str) -> float | None:
    """wrk's own ``Requests/sec:`` figure (a cross-check of requests / duration)."""
    match = re.search(r"Requests/sec:\s+([\d.]+[kMG]?)", text)
    return _count(match.group(1)) if match else None
