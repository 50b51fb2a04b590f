"""``python -m bench.run`` (``make bench``): this server vs MLServer, PyTriton, LitServe and raw onnxruntime.

One run on one machine: build the reference models, start each peer in turn on
127.0.0.1 with the same number of worker processes, drive it with wrk (REST), h2load
(gRPC) and Python clients (shared memory), sample its memory, stop it; then write
``bench/results/<timestamp>.json`` and the Markdown for BENCHMARKS.md. By default the
cells are those the issue's targets need (about 20 minutes on 2 cores with every peer);
``--concurrency`` sweeps every path at the levels given instead.

Examples::

    python -m bench.run --quick                      # smoke run, 3 s cells, 1 repetition
    python -m bench.run --write-md BENCHMARKS.md     # the full run for the record
    python -m bench.run --peers pytriton --only mlp:v2-binary --duration 2 --reps 1
    python -m bench.run --peers ours --only tabular:grpc:32,tabular:v2-binary:32,tabular:py-grpc:32
    python -m bench.run --peers ours --models tabular --concurrency 32 --profile
    python -m bench.run --render bench/results/20250101-120000.json --write-md BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from bench import h2load, loadgen, models, report
from bench.memory import MemorySampler
from bench.more_peers import LitServePeer, PyTritonPeer
from bench.payloads import ALL_PATHS
from bench.peers import MLServerPeer, OrtPeer, OurServer, Peer, PeerOptions, PeerUnavailable
from bench.runner import SWEEP_CONCURRENCY, RunSettings, plan, run_cell
from bench.stats import Cell
from bench.venv import LITSERVE, MLSERVER, PYTRITON, REPO_ROOT, PeerVenv, ensure_venv, package_version

log = logging.getLogger("bench")

PEERS = ("ours", "mlserver", "mlserver-parallel", "pytriton", "litserve", "ort")
RUN_ORDER = ("ort", "mlserver", "mlserver-parallel", "litserve", "pytriton", "ours")
MODELS = ("tabular", "mlp", "cnn")
# The models each peer serves: what the targets compare it on (every peer: tabular;
# MLServer: the CNN; Triton's dynamic batcher: the MLP), keeping the run near 20 minutes.
PEER_MODELS = {
    "ours": MODELS,
    "ort": MODELS,
    "mlserver": ("tabular", "cnn"),
    "mlserver-parallel": ("tabular", "cnn"),
    "pytriton": ("tabular", "mlp"),
    "litserve": ("tabular",),
}
VENVS: dict[str, PeerVenv] = {
    "mlserver": MLSERVER,
    "mlserver-parallel": MLSERVER,
    "pytriton": PYTRITON,
    "litserve": LITSERVE,
}
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _csv(value))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s, 1 repetition")
    parser.add_argument("--duration", type=float, help="seconds per repetition (default 10; quick 3)")
    parser.add_argument(
        "--reps", type=int, help="repetitions per cell, medians reported (default 3; quick 1)"
    )
    parser.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 2; quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every server (default 2)")
    parser.add_argument(
        "--frontends", type=int, default=2, help="this server's HTTP frontend processes (its default: 2)"
    )
    parser.add_argument("--peers", type=_csv, default=list(PEERS), help=f"comma list of {','.join(PEERS)}")
    parser.add_argument("--models", type=_csv, default=list(MODELS), help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--paths", type=_csv, default=[], help=f"only these paths ({','.join(ALL_PATHS)})")
    parser.add_argument(
        "--concurrency",
        type=_ints,
        help="sweep every path at these levels, e.g. "
        f"{','.join(map(str, SWEEP_CONCURRENCY))} (default: the cells the targets need)",
    )
    parser.add_argument(
        "--only",
        type=_csv,
        default=[],
        metavar="MODEL:PATH[:C],...",
        help="only these cells, e.g. tabular:v2-json:1,mlp:v2-binary (* matches any)",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--py-clients-max", type=int, default=8, help="most Python client processes")
    parser.add_argument(
        "--start-timeout", type=float, default=180.0, help="seconds a server may take to be ready"
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for this server"
    )
    parser.add_argument(
        "--ours-command",
        type=shlex.split,
        default=[],
        help="command starting this server (default: model-server serve)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy flame graphs during --profile-cell")
    parser.add_argument("--profile-cell", default="tabular:v2-json:32", help="model:path:concurrency")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S s for an idle CPU before each peer and cell",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--write-md", type=Path, help="replace the bench section of this Markdown file")
    parser.add_argument("--render", type=Path, help="only render an existing results JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    unknown = [p for p in args.peers if p not in PEERS] + [m for m in args.models if m not in MODELS]
    unknown += [p for p in args.paths if p not in ALL_PATHS]
    if unknown:
        parser.error(f"unknown name(s): {', '.join(unknown)}")
    return args


def run_settings(args: argparse.Namespace, results_dir: Path) -> RunSettings:
    model, path, conc = args.profile_cell.split(":")
    return RunSettings(
        duration_s=args.duration or (3.0 if args.quick else 10.0),
        reps=args.reps or (1 if args.quick else 3),
        warmup_s=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        concurrency=tuple(args.concurrency or ()),
        only=tuple(args.only),
        batch=args.batch,
        timeout_s=args.timeout,
        py_client_max=args.py_clients_max,
        paths=tuple(args.paths),
        profile=args.profile,
        profile_cell=(model, path, int(conc)),
        quick=args.quick,
        results_dir=results_dir,
    )


# --- facts for the report ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
    }


def _version(*names: str) -> str:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def git_rev() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "no commit"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions(pythons: dict[str, Path]) -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "model-server": f"{_version('model-server')} (git {git_rev()})",
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "numpy": _version("numpy"),
        "scikit-learn": _version("scikit-learn"),
        "skl2onnx": _version("skl2onnx"),
        "wrk": loadgen.wrk_version(),
        "h2load": h2load.h2load_version(),
    }
    for peer, package in (
        ("mlserver", "mlserver"),
        ("pytriton", "nvidia-pytriton"),
        ("litserve", "litserve"),
    ):
        python = pythons.get(peer)
        if python is not None:
            found[package] = package_version(python, package)
            found[f"onnxruntime ({peer} venv)"] = package_version(python, "onnxruntime")
    return found


# --- models -----------------------------------------------------------------------------


def build_models_cached(names: list[str], cache_dir: Path) -> dict[str, Path]:
    """Build the reference models once per (builder source, seed, library versions)."""
    source = Path(models.__file__).read_bytes()
    libs = [_version(n) for n in ("scikit-learn", "skl2onnx", "onnx", "numpy")]
    key = hashlib.sha256(source + repr((models.SEED, libs)).encode()).hexdigest()[:16]
    manifest = cache_dir / "manifest.json"
    cached: dict[str, str] = {}
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("key") == key:
            cached = data.get("models", {})
    paths: dict[str, Path] = {}
    missing = [n for n in names if not (n in cached and (cache_dir / cached[n]).exists())]
    if missing:
        log.info("building reference models %s (seeded)", ", ".join(missing))
        paths.update(models.build_models(cache_dir, missing))
    for name in names:
        paths.setdefault(name, cache_dir / f"{name}.onnx")
    cached.update({n: p.name for n, p in paths.items()})
    manifest.write_text(json.dumps({"key": key, "models": cached}, indent=2) + "\n")
    return paths


# --- running ------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.json_path = args.results_dir / f"{stamp}.json"
        self.work_dir = args.results_dir / stamp
        self.settings = run_settings(args, self.work_dir)
        self.options = PeerOptions(
            workers=args.workers,
            frontends=args.frontends,
            start_timeout_s=args.start_timeout,
            extra_env=dict(item.split("=", 1) for item in args.server_env),
            ours_command=args.ours_command,
        )
        self.cells: list[Cell] = []
        self.peers: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.venv_errors: dict[str, str] = {}

    def execute(self) -> dict[str, Any]:
        args = self.args
        self.work_dir.mkdir(parents=True, exist_ok=True)
        model_files = build_models_cached(args.models, args.results_dir / "models")
        pythons = self.prepare_venvs()
        self.results = {
            "schema": 1,
            "meta": {
                "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": "python -m bench.run " + shlex.join(sys.argv[1:]),
                "machine": machine(),
                "versions": versions({VENVS[n].name: p for n, p in pythons.items()}),
                "settings": self.settings_json(),
            },
            "models": {
                name: {
                    "description": models.REFERENCE_MODELS[name].description,
                    "sha256": models.sha256(path),
                    "bytes": path.stat().st_size,
                }
                for name, path in model_files.items()
            },
            "peers": self.peers,
            "cells": [],
        }
        for name in [p for p in RUN_ORDER if p in args.peers]:
            files = {m: path for m, path in model_files.items() if m in PEER_MODELS[name]}
            peer = self.make_peer(name, files, pythons.get(name))
            self.run_peer(peer, files)
            self.save()
        return self.results

    def prepare_venvs(self) -> dict[str, Path]:
        """The interpreter of each peer with its own venv; a peer whose venv fails is left out
        (its cells are reported "not available" with the reason)."""
        pythons: dict[str, Path] = {}
        for name in [p for p in self.args.peers if p in VENVS]:
            try:
                pythons[name] = ensure_venv(VENVS[name])
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                self.venv_errors[name] = f"cannot build {VENVS[name].venv.name}: {exc}"
                log.warning("%s not available: %s", name, self.venv_errors[name])
        return pythons

    def settings_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "duration_s": s.duration_s,
            "reps": s.reps,
            "warmup_s": s.warmup_s,
            "concurrency": list(s.concurrency),
            "batch": s.batch,
            "workers": self.options.workers,
            "frontends": self.options.frontends,
            "timeout_s": s.timeout_s,
            "py_clients_max": s.py_client_max,
            "quick": s.quick,
            "models": self.args.models,
            "peers": self.args.peers,
            "only": self.args.only,
        }

    def make_peer(self, name: str, model_files: dict[str, Path], python: Path | None) -> Peer:
        if name == "ort":
            return OrtPeer(self.work_dir, self.options)
        if name == "ours":
            repository = models.layout_repository(model_files, self.work_dir / "repository")
            return OurServer(self.work_dir, self.options, repository, list(model_files))
        python = python or VENVS[name].venv / "bin" / "python"  # run_peer reports a failed venv
        if name == "pytriton":
            return PyTritonPeer(self.work_dir, self.options, model_files, python)
        if name == "litserve":
            return LitServePeer(self.work_dir, self.options, model_files, python)
        models_dir = models.layout_mlserver(model_files, self.work_dir / f"{name}-models")
        return MLServerPeer(
            self.work_dir, self.options, models_dir, python, parallel=name.endswith("parallel")
        )

    def run_peer(self, peer: Peer, model_files: dict[str, Path]) -> None:
        cells = plan(peer, list(model_files), self.settings)
        info: dict[str, Any] = {"label": peer.label, "available": True, "note": "", "settings": {}}
        info["settings_short"] = _short_settings(peer, self.options)
        self.peers[peer.name] = info
        per_cell = self.settings.warmup_s + self.settings.reps * self.settings.duration_s + 1.5
        log.info("== %s: %d cells, about %.0f s", peer.label, len(cells), len(cells) * per_cell)
        busy = wait_quiet(self.args.wait_quiet)
        info["cpu_busy_before_pct"] = busy
        if busy > report.BUSY_PCT:
            log.warning(
                "the machine was %.0f%% busy before %s started: other processes will perturb its numbers",
                busy, peer.name,
            )  # fmt: skip
        sampler = MemorySampler(peer.pids).start()
        try:
            try:
                if peer.name in self.venv_errors:
                    raise PeerUnavailable(self.venv_errors[peer.name])
                peer.start()
            except PeerUnavailable as exc:
                info["available"] = False
                info["note"] = str(exc)
                log.warning("%s not available: %s", peer.name, exc)
                for cell in cells:
                    cell.error = "peer not available"
                self.cells.extend(cells)
                return
            info["settings"] = peer.settings()
            for number, cell in enumerate(cells, 1):
                if self.args.wait_quiet > 0:
                    wait_quiet(self.args.wait_quiet)
                started = time.monotonic()
                run_cell(peer, cell, self.settings, model_files)
                self.cells.append(cell)
                _log_cell(number, len(cells), cell, time.monotonic() - started)
        finally:
            peer.stop()
            peak = sampler.stop()
            info["memory"] = {
                "rss_bytes": peak.rss_bytes,
                "pss_bytes": peak.pss_bytes,
                "processes": peak.processes,
            }
            if peer.note:
                info["note"] = (info["note"] + " " + peer.note).strip()

    def save(self) -> None:
        self.results["cells"] = [cell.to_json() for cell in self.cells]
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.results, indent=1) + "\n")


def wait_quiet(limit_s: float) -> float:
    """CPU use over one second, after waiting up to ``limit_s`` for it to drop below the warning level."""
    deadline = time.monotonic() + limit_s
    busy = psutil.cpu_percent(interval=1.0)
    while busy > report.BUSY_PCT and time.monotonic() < deadline:
        log.info("machine %.0f%% busy: waiting for it to settle (--wait-quiet)", busy)
        busy = psutil.cpu_percent(interval=5.0)
    return busy


def _short_settings(peer: Peer, options: PeerOptions) -> dict[str, Any]:
    if isinstance(peer, OurServer):
        return {"workers": options.workers, "frontends": options.frontends, "ort threads": 1}
    if isinstance(peer, MLServerPeer):
        return {"parallel_workers": peer.parallel_workers, "ort threads": 1, "metrics": "off"}
    if isinstance(peer, PyTritonPeer):
        return {"instances": options.workers, "ort threads": 1, "mlp_batched": "DynamicBatcher"}
    if isinstance(peer, LitServePeer):
        return {"api servers": 2, "workers": options.workers, "fast_queue": True, "ort threads": 1}
    return {"ort threads": 1}


def _log_cell(number: int, total: int, cell: Cell, seconds: float) -> None:
    where = f"[{number}/{total}] {cell.peer} {cell.model} {cell.path}{' +batching' if cell.batching else ''}"
    where += f" c={cell.concurrency} b={cell.batch}"
    if cell.ok:
        log.info(
            "%s: %s req/s, p50 %s ms, p99 %s ms, %d errors, mean batch %s, frontend CPU %s µs/req (%.0f s)",
            where, report.fmt_num(cell.rps), report.fmt_num(cell.p50_ms), report.fmt_num(cell.p99_ms),
            cell.errors, report.fmt_optional(cell.mean_batch_rows), report.fmt_optional(cell.frontend_cpu_us),
            seconds,
        )  # fmt: skip
    else:
        log.info("%s: %s", where, cell.error)


def write_markdown(results: dict[str, Any], json_path: Path | None, target: Path | None) -> str:
    section = report.render_markdown(results)
    if json_path is not None:
        json_path.with_suffix(".md").write_text(section)
    if target is not None:
        existing = target.read_text() if target.exists() else "# Benchmarks\n\n"
        target.write_text(report.replace_section(existing, section))
        log.info("wrote the results section of %s", target)
    return section


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.render:
        results = json.loads(args.render.read_text())
        print(write_markdown(results, None, args.write_md))
        return 0
    http_peers = [p for p in args.peers if p != "ort"]
    if http_peers and loadgen.wrk_path() is None:
        print(loadgen.INSTALL_HINT, file=sys.stderr)
        return 2
    run = Run(args)
    # A command-line tool, not a server role: SIGTERM (timeout, CI) takes the Ctrl-C path,
    # so the peers it started are stopped and what was measured is saved.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run.execute()
    except KeyboardInterrupt:
        log.warning("interrupted: saving what was measured")
        results = run.results
    finally:
        if run.results:
            run.save()
    if not results:
        return 1
    print(write_markdown(results, run.json_path, args.write_md))
    print("Targets:")
    report.summary_lines(results)
    print(f"Results: {run.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
