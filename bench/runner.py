"""The generic cell runner: which cells each peer gets, and how one cell is measured.

A cell is peer x model x path x concurrency x batch (x dynamic batching on/off). For
each cell: check one request answers correctly (a fast error must not pass for
throughput), warm up, then time ``reps`` repetitions of ``duration_s`` each. The
report takes medians over the repetitions. Around the timed repetitions the runner
also reads what the cell cost inside the server (:mod:`bench.serverstats`): the mean
executed batch size and this server's frontend CPU per request.

Which cells: by default the cells the issue's targets and per-path costs need
(:data:`TARGET_PLAN`), so ``make bench`` with every peer stays near 20 minutes on 2
cores; ``--concurrency`` asks for the old sweep, every path at every level given.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from bench import h2load, loadgen, pyclient
from bench.grpc_cell import GrpcCell, server_problem
from bench.interference import CpuAccount
from bench.models import REFERENCE_MODELS, sample_input
from bench.payloads import (
    H2LOAD_PATHS,
    HEADER_LENGTH,
    OPT_IN_PATHS,
    ORT_PATH,
    PY_PATHS,
    WRK_PATHS,
    check_response,
    shm_region_name,
    supports,
    write_payload,
)
from bench.peers import HOST, OrtPeer, Peer, http_request
from bench.serverstats import BatchCounters, cpu_seconds, cpu_us_per_request, mean_batch
from bench.stats import SKIPPED, Cell, Rep

log = logging.getLogger(__name__)

SWEEP_CONCURRENCY = (1, 8, 32, 64)
MLP_BATCHING_CONCURRENCY = 32  # the batching target's concurrency, always measured for the MLP
ORT_MLP_BATCHES = (1, 32)  # the MLP is compute-bound: batch 32 does several times batch 1's rows/s
# The default plan: model -> path -> concurrencies. Tabular: the c=1 latency and c=32
# throughput targets on V2 JSON for every peer, and each other path at c=32 for its
# frontend CPU per request (and gRPC against REST binary). MLP: 1-row binary requests at
# c=32, batched and not. CNN: V2 JSON at c=8.
TARGET_PLAN: dict[str, dict[str, tuple[int, ...]]] = {
    "tabular": {
        "v2-json": (1, 32),
        "v2-binary": (32,),
        "v1-records": (32,),
        "v2-shm": (32,),
        "grpc": (32,),
    },
    "mlp": {"v2-binary": (MLP_BATCHING_CONCURRENCY,)},
    "cnn": {"v2-json": (8,)},
}


@dataclass
class RunSettings:
    duration_s: float = 10.0
    reps: int = 3
    warmup_s: float = 2.0
    concurrency: tuple[int, ...] = ()  # empty: TARGET_PLAN; else a sweep over these levels
    batch: int = 1
    timeout_s: float = 30.0  # wrk --timeout and the Python client's socket timeout
    py_client_max: int = 8  # most Python client processes for the py-* paths
    paths: tuple[str, ...] = ()  # empty: every path each peer supports
    profile: bool = False
    profile_cell: tuple[str, str, int] = ("tabular", "v2-json", 32)
    quick: bool = False
    results_dir: Path = field(default_factory=lambda: Path("bench/results"))
    only: tuple[str, ...] = ()  # "model:path[:c]" patterns; empty: every planned cell


def selected(settings: RunSettings, model: str, path: str, concurrency: int) -> bool:
    """Whether ``--only`` keeps this cell (``model:path`` or ``model:path:c``; ``*`` matches any)."""
    if not settings.only:
        return True
    for pattern in settings.only:
        parts = pattern.split(":")
        want = (model, path, str(concurrency))[: len(parts)]
        if all(p in ("*", w) for p, w in zip(parts, want, strict=True)):
            return True
    return False


def _named_levels(settings: RunSettings, model: str, path: str) -> set[int]:
    """Concurrencies that ``--only`` names for this model and path (``model:path:c``)."""
    levels: set[int] = set()
    for pattern in settings.only:
        parts = pattern.split(":")
        if len(parts) == 3 and parts[0] in ("*", model) and parts[1] == path and parts[2].isdigit():
            levels.add(int(parts[2]))
    return levels


def concurrencies(settings: RunSettings, model: str, path: str, opt_in: tuple[str, ...] = ()) -> list[int]:
    """The levels a cell runs at; none for an opt-in path (py-grpc, ``opt_in``) that neither
    ``--paths`` nor ``--only`` names."""
    named = _named_levels(settings, model, path)
    if path in OPT_IN_PATHS + opt_in and path not in settings.paths and not named:
        return []
    if not settings.concurrency:
        planned = TARGET_PLAN.get(model, {}).get("grpc" if path == "py-grpc" else path, ())
        return sorted(set(planned) | named)
    levels = set(settings.concurrency)
    if model == "mlp" and path in WRK_PATHS:
        levels.add(MLP_BATCHING_CONCURRENCY)
    if path in ("py-binary", "py-shm"):
        levels = {min(level, settings.py_client_max) for level in levels}
    if path == ORT_PATH:
        levels = {1}
    return sorted(levels)


def _ort_cells(peer: Peer, model: str, settings: RunSettings) -> list[Cell]:
    if not selected(settings, model, ORT_PATH, 1):
        return []
    batches = ORT_MLP_BATCHES if model == "mlp" else (settings.batch,)
    return [
        Cell(peer.name, model, ORT_PATH, 1, batch, client="in-process loop, 1 thread")
        for batch in sorted({settings.batch, *batches})
    ]


def _server_cells(peer: Peer, model: str, path: str, settings: RunSettings) -> list[Cell]:
    batching_variants = model == "mlp" and peer.supports_batching() and path in WRK_PATHS
    cells: list[Cell] = []
    for batching in [False, True] if batching_variants else [False]:
        for level in concurrencies(settings, model, path, peer.opt_in_paths):
            if selected(settings, model, path, level):
                served_as = peer.model_id(model, batching)
                cells.append(
                    Cell(
                        peer.name, model, path, level, settings.batch, batching=batching, served_as=served_as
                    )
                )
    return cells


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
                cells += _ort_cells(peer, model, settings)
            else:
                cells += _server_cells(peer, model, path, settings)
    return cells


class ServerSide:
    """Around the timed repetitions: frontend CPU and batch counters before and after."""

    def __init__(self, peer: Peer, cell: Cell) -> None:
        self.peer = peer
        self.cell = cell
        self.cpu: dict[int, float] = {}
        self.batches: BatchCounters | None = None

    def _counters(self) -> BatchCounters | None:
        try:
            return self.peer.batch_counters(self.cell.served_as or self.cell.model)
        except (OSError, ValueError) as exc:
            log.debug("%s: no batch counters: %s", self.peer.name, exc)
            return None

    # The /metrics reads sit outside the CPU window: their own frontend CPU is not the cell's.
    def __enter__(self) -> ServerSide:
        self.batches = self._counters()
        self.cpu = cpu_seconds(self.peer.frontend_pids())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            return
        requests = sum(rep.requests for rep in self.cell.reps)
        after = cpu_seconds(self.cpu)
        self.cell.frontend_cpu_us = cpu_us_per_request(self.cpu, after, requests)
        self.cell.mean_batch_rows = mean_batch(self.batches, self._counters())


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
        elif cell.path in H2LOAD_PATHS:
            _run_grpc_cell(peer, cell, settings)
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
    with ServerSide(peer, cell):
        for _ in range(settings.reps):
            cell.reps.append(
                loadgen.run_wrk(peer.url, payload, cell.concurrency, settings.duration_s, settings.timeout_s)
            )


def grpc_unreachable(peer: Peer, wait_s: float = 5.0) -> str | None:
    """Why ``peer``'s gRPC port cannot be used, or None once something listens on it (the gRPC
    listener may come up a moment after HTTP readiness: retried for ``wait_s``)."""
    if not peer.grpc_port:
        return f"{peer.name} has no gRPC endpoint"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((HOST, peer.grpc_port), timeout=2.0):
                return None
        except OSError as exc:
            if time.monotonic() >= deadline:
                return (
                    f"nothing listens on {peer.name}'s gRPC port {peer.grpc_port} ({exc.strerror or exc}); "
                    "this build of the server has no gRPC frontend (MODEL_SERVER_GRPC_PORT)"
                )
        time.sleep(0.5)


def _skip_grpc(peer: Peer, cell: Cell) -> bool:
    """Skip a gRPC cell (with the reason) where the peer has no gRPC port or h2load is missing."""
    reason = grpc_unreachable(peer)
    if reason is None and cell.path in H2LOAD_PATHS and h2load.h2load_path() is None:
        log.warning("%s", h2load.INSTALL_HINT)
        reason = "h2load is not installed (sudo apt-get install -y nghttp2-client)"
    if reason is None:
        return False
    cell.error = SKIPPED + reason
    log.info("%s %s %s c=%d %s", cell.peer, cell.model, cell.path, cell.concurrency, cell.error)
    return True


def _run_grpc_cell(peer: Peer, cell: Cell, settings: RunSettings) -> None:
    """h2load against the gRPC port, guarded by :mod:`bench.grpc_cell` against gRPC errors
    passing for throughput."""
    if _skip_grpc(peer, cell):
        return
    grpc_cell = GrpcCell.prepare(peer, cell, settings.results_dir, settings.timeout_s)
    if settings.warmup_s > 0:
        grpc_cell.run(settings.warmup_s)
    before = grpc_cell.counters()
    runs: list[h2load.Run] = []
    with ServerSide(peer, cell):
        for _ in range(settings.reps):
            runs.append(grpc_cell.run(settings.duration_s))
            cell.reps.append(runs[-1].rep)
    problem = server_problem(before, grpc_cell.counters(), runs)
    if problem:
        raise RuntimeError(f"gRPC answers do not add up: {problem}")


def _run_py_cell(peer: Peer, cell: Cell, settings: RunSettings) -> None:
    processes, threads = cell.concurrency, 1
    if cell.path == "py-grpc":
        if _skip_grpc(peer, cell):
            return
        processes, threads = pyclient.grpc_layout(cell.concurrency, settings.py_client_max)
        cell.client = pyclient.GRPC_CLIENT_LABEL.format(p=processes, t=threads)
    else:
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
        grpc_port=peer.grpc_port,
        threads=threads,
    )
    with ServerSide(peer, cell):
        for _ in range(settings.reps):
            cell.reps.append(pyclient.run_clients(job, processes))


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
