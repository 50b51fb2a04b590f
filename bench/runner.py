"""The generic cell runner: which cells each peer gets, and how one cell is measured.

A cell is peer x model x path x concurrency x batch (x dynamic batching on/off). For
each cell: check one request answers correctly (a fast error must not pass for
throughput), warm up, then time ``reps`` repetitions of ``duration_s`` each. The
report takes medians over the repetitions.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import loadgen, pyclient
from bench.interference import CpuAccount
from bench.models import REFERENCE_MODELS, sample_input
from bench.payloads import (
    HEADER_LENGTH,
    ORT_PATH,
    PY_PATHS,
    WRK_PATHS,
    check_response,
    shm_region_name,
    supports,
    write_payload,
)
from bench.peers import HOST, OrtPeer, Peer, http_request
from bench.stats import Cell, Rep

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = (1, 8, 32, 64)
QUICK_CONCURRENCY = (1, 32)
MLP_BATCHING_CONCURRENCY = 64  # the batching target's concurrency, always measured for the MLP
ORT_MLP_BATCHES = (1, 8, 32, 64)


@dataclass
class RunSettings:
    duration_s: float = 10.0
    reps: int = 3
    warmup_s: float = 2.0
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    batch: int = 1
    timeout_s: float = 30.0  # wrk --timeout and the Python client's socket timeout
    py_client_max: int = 8  # most Python client processes for the py-* paths
    paths: tuple[str, ...] = ()  # empty: every path each peer supports
    profile: bool = False
    profile_cell: tuple[str, str, int] = ("tabular", "v2-json", 32)
    quick: bool = False
    results_dir: Path = field(default_factory=lambda: Path("bench/results"))


def concurrencies(settings: RunSettings, model: str, path: str) -> list[int]:
    levels = set(settings.concurrency)
    if model == "mlp" and path in WRK_PATHS:
        levels.add(MLP_BATCHING_CONCURRENCY)
    if path in PY_PATHS:
        levels = {min(level, settings.py_client_max) for level in levels}
    if path == ORT_PATH:
        levels = {1}
    return sorted(levels)


def plan(peer: Peer, models: list[str], settings: RunSettings) -> list[Cell]:
    """Every cell ``peer`` runs, in order."""
    cells: list[Cell] = []
    for model in models:
        spec = REFERENCE_MODELS[model]
        for path in peer.paths:
            if settings.paths and path not in settings.paths and path != ORT_PATH:
                continue
            if not supports(spec, path):
                continue
            if path == ORT_PATH:
                batches = ORT_MLP_BATCHES if model == "mlp" else (settings.batch,)
                for batch in sorted({settings.batch, *batches}):
                    cells.append(Cell(peer.name, model, path, 1, batch, client="in-process loop, 1 thread"))
                continue
            variants = (
                [False, True]
                if model == "mlp" and peer.supports_batching() and path in WRK_PATHS
                else [False]
            )
            for batching in variants:
                for level in concurrencies(settings, model, path):
                    cells.append(
                        Cell(
                            peer.name,
                            model,
                            path,
                            level,
                            settings.batch,
                            batching=batching,
                            served_as=peer.model_id(model, batching),
                        )
                    )
    return cells


def run_cell(peer: Peer, cell: Cell, settings: RunSettings, model_files: dict[str, Path]) -> None:
    """Measure ``cell`` in place: fills ``cell.reps`` or sets ``cell.error``."""
    account = CpuAccount(peer.pids)
    try:
        if cell.path == ORT_PATH:
            assert isinstance(peer, OrtPeer)
            reps = peer.run(
                model_files[cell.model],
                cell.model,
                cell.batch,
                settings.duration_s,
                settings.warmup_s,
                settings.reps,
            )
            cell.reps = [Rep.from_json(rep) for rep in reps]
        elif cell.path in WRK_PATHS:
            _run_wrk_cell(peer, cell, settings)
        elif cell.path in PY_PATHS:
            _run_py_cell(peer, cell, settings)
        else:
            raise ValueError(f"unknown path {cell.path!r}")
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        cell.error = f"{type(exc).__name__}: {exc}"[:600]
        log.warning("%s %s %s c=%d: %s", cell.peer, cell.model, cell.path, cell.concurrency, cell.error)
    cell.busy_elsewhere_pct = round(account.foreign_pct(), 1)


def _run_wrk_cell(peer: Peer, cell: Cell, settings: RunSettings) -> None:
    if cell.path != "v2-shm":
        _measure_wrk_cell(peer, cell, settings)
        return
    # The input lives in a client region, written once and registered for the cell.
    spec = REFERENCE_MODELS[cell.model]
    array = sample_input(spec, cell.batch)
    name = shm_region_name(cell.served_as)
    shm_path = Path("/dev/shm") / name
    fd = os.open(shm_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, array.nbytes)
        os.pwrite(fd, np.ascontiguousarray(array, dtype="<f4").tobytes(), 0)
    finally:
        os.close(fd)
    try:
        register = json.dumps({"key": f"/{name}", "offset": 0, "byte_size": int(array.nbytes)}).encode()
        status, _, body = http_request(
            peer.port,
            "POST",
            f"/v2/systemsharedmemory/region/{name}/register",
            register,
            {"Content-Type": "application/json"},
            timeout=settings.timeout_s,
        )
        if status != 200:
            raise RuntimeError(f"cannot register region {name}: HTTP {status} {body[:200]!r}")
        _measure_wrk_cell(peer, cell, settings)
    finally:
        http_request(
            peer.port,
            "POST",
            f"/v2/systemsharedmemory/region/{name}/unregister",
            b"",
            {},
            timeout=settings.timeout_s,
        )
        shm_path.unlink(missing_ok=True)


def _measure_wrk_cell(peer: Peer, cell: Cell, settings: RunSettings) -> None:
    spec = REFERENCE_MODELS[cell.model]
    payload = write_payload(spec, cell.served_as, cell.path, cell.batch, settings.results_dir / "bodies")
    status, headers, body = http_request(
        peer.port,
        "POST",
        payload.endpoint,
        payload.body_file.read_bytes(),
        {"Content-Type": payload.content_type}
        | ({HEADER_LENGTH: str(payload.header_length)} if payload.header_length is not None else {}),
        timeout=settings.timeout_s,
    )
    problem = check_response(cell.path, status, headers, body)
    if problem:
        raise RuntimeError(f"check request failed: {problem}")
    cell.client = f"wrk {loadgen.wrk_version()}, {loadgen.wrk_threads(cell.concurrency)} thread(s)"
    if settings.warmup_s > 0:
        loadgen.run_wrk(peer.url, payload, cell.concurrency, settings.warmup_s, settings.timeout_s)
    profiling = _start_profile(peer, cell, settings)
    if profiling:  # an extra, unrecorded run: py-spy slows what it samples
        try:
            loadgen.run_wrk(peer.url, payload, cell.concurrency, settings.duration_s, settings.timeout_s)
        finally:
            _finish_profile(profiling)
    for _ in range(settings.reps):
        cell.reps.append(
            loadgen.run_wrk(peer.url, payload, cell.concurrency, settings.duration_s, settings.timeout_s)
        )


def _run_py_cell(peer: Peer, cell: Cell, settings: RunSettings) -> None:
    cell.client = pyclient.CLIENT_LABEL.format(k=cell.concurrency)
    job = pyclient.ClientJob(
        host=HOST,
        port=peer.port,
        model=cell.model,
        model_id=cell.served_as,
        path=cell.path,
        batch=cell.batch,
        duration_s=settings.duration_s,
        warmup_s=settings.warmup_s,
        timeout_s=settings.timeout_s,
    )
    for _ in range(settings.reps):
        cell.reps.append(pyclient.run_clients(job, cell.concurrency))


# --- py-spy --------------------------------------------------------------------------


def _start_profile(
    peer: Peer, cell: Cell, settings: RunSettings
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    if (
        not settings.profile
        or (cell.model, cell.path, cell.concurrency) != settings.profile_cell
        or cell.batching
    ):
        return []
    from bench.profiling import start_py_spy

    out_dir = settings.results_dir / "profiles"
    started = []
    for role, pid in peer.profile_targets():
        target = out_dir / f"{peer.name}-{role}-{cell.model}-{cell.path}-c{cell.concurrency}.svg"
        proc = start_py_spy(pid, target, settings.duration_s)
        if proc is not None:
            started.append((proc, target))
    if not started:
        log.warning("profile: nothing to attach to for %s", peer.name)
    return started


def _finish_profile(started: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    from bench.profiling import finish_py_spy

    for proc, target in started:
        finish_py_spy(proc, target)
