"""Results JSON -> ratios, target verdicts and the Markdown for BENCHMARKS.md (pure).

Ratios compare medians of the same model, concurrency and batch size:
- ``÷ best peer``: this server's req/s over the best other server's req/s on the same
  path (V2 JSON, V2 binary, gRPC) with the same batching;
- ``÷ ORT``: rows/s over raw onnxruntime's rows/s (one thread, same batch size).
Per cell also: the mean executed batch (rows per model execution) and this server's
frontend CPU per request (:mod:`bench.serverstats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bench.stats import Cell

OURS, MLS, MLS_PAR, ORT = "ours", "mlserver", "mlserver-parallel", "ort"
TRITON, LIT = "pytriton", "litserve"
MD_START, MD_END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET_CONCURRENCY = 32
BUSY_PCT = 15.0  # CPU use before a peer starts above which the report warns
NOISY_PCT = 10.0  # CPU used by other processes during a cell above which it is flagged
FRONTEND_CPU_LIMIT_US = 300.0  # issue 12: frontend CPU per small request
PATH_ORDER = (
    "v2-json", "v2-binary", "v1-records", "v2-shm", "grpc", "py-binary", "py-shm", "py-grpc", "in-process"
)  # fmt: skip
PEER_ORDER = (OURS, MLS, MLS_PAR, TRITON, LIT, ORT)
MODEL_ORDER = ("tabular", "mlp", "cnn")
PATH_CLIENT = {
    "v2-json": "wrk",
    "v2-binary": "wrk",
    "v1-records": "wrk",
    "v2-shm": "wrk",
    "py-binary": "Python client",
    "py-shm": "Python client",
    "grpc": "h2load",
    "py-grpc": "tritonclient.grpc",
    "in-process": "loop",
}

Key = tuple[str, str, str, int, int, bool]
Getter = Callable[..., "Cell | None"]


def cells_of(results: dict[str, Any]) -> list[Cell]:
    return [Cell.from_json(data) for data in results.get("cells", [])]


def index(cells: Iterable[Cell]) -> dict[Key, Cell]:
    return {cell.key: cell for cell in cells if cell.ok}


def find(
    idx: dict[Key, Cell],
    peer: str,
    model: str,
    path: str,
    concurrency: int,
    batch: int = 1,
    batching: bool = False,
) -> Cell | None:
    return idx.get((peer, model, path, concurrency, batch, batching))


def ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def best_peer(idx: dict[Key, Cell], cell: Cell) -> Cell | None:
    """The fastest other server (not raw onnxruntime) on ``cell``'s model, path, c, batch, batching."""
    others = [
        other
        for other in idx.values()
        if other.peer not in (cell.peer, ORT)
        and (other.model, other.path, other.concurrency, other.batch, other.batching)
        == (cell.model, cell.path, cell.concurrency, cell.batch, cell.batching)
    ]
    return max(others, key=lambda other: other.rps) if others else None


def vs_best_peer(idx: dict[Key, Cell], cell: Cell) -> float | None:
    """This server's req/s over the best other server's on the same path."""
    if cell.peer != OURS:
        return None
    other = best_peer(idx, cell)
    return ratio(cell.rps, other.rps) if other else None


def vs_ort(idx: dict[Key, Cell], cell: Cell) -> float | None:
    """rows/s over raw onnxruntime's rows/s (one thread) at the same batch size."""
    if cell.peer == ORT:
        return None
    other = find(idx, ORT, cell.model, "in-process", 1, cell.batch)
    return ratio(cell.rows_per_s, other.rows_per_s) if other else None


# --- targets ---------------------------------------------------------------------------


@dataclass
class Verdict:
    target: str
    measured: str
    status: str  # "met", "missed by N%", "not measured"

    @property
    def met(self) -> bool:
        return self.status == "met"


def at_least(target: str, actual: float | None, required: float | None, what: str) -> Verdict:
    """``actual >= required``; a miss says by how much ``actual`` falls short in %."""
    if actual is None or required is None or math.isnan(actual) or math.isnan(required):
        return Verdict(target, "—", "not measured")
    measured = f"{what}: {fmt_num(actual)} vs needed {fmt_num(required)}"
    if actual >= required:
        return Verdict(target, measured, "met")
    short = (1.0 - actual / required) * 100.0 if required > 0 else 100.0
    return Verdict(target, measured, f"missed by {short:.0f}%")


def at_most(target: str, actual: float | None, limit: float, what: str) -> Verdict:
    """``actual <= limit``; a miss says by how much ``actual`` is over the limit in %."""
    if actual is None or math.isnan(actual):
        return Verdict(target, "—", "not measured")
    measured = f"{what}: {fmt_num(actual)} vs limit {fmt_num(limit)}"
    if actual <= limit:
        return Verdict(target, measured, "met")
    return Verdict(target, measured, f"missed by {(actual / limit - 1.0) * 100.0:.0f}%")


def _rps(cell: Cell | None) -> float | None:
    return cell.rps if cell else None


def _times(factor: float, value: float | None) -> float | None:
    return factor * value if value is not None else None


def _tabular_targets(get: Getter, idx: dict[Key, Cell]) -> list[Verdict]:
    c = TARGET_CONCURRENCY
    verdicts: list[Verdict] = []
    ours_c1 = get(OURS, "tabular", "v2-json", 1)
    peers_c1 = [
        cell
        for cell in idx.values()
        if cell.peer not in (OURS, ORT) and cell.key[1:] == ("tabular", "v2-json", 1, 1, False)
    ]
    fastest = min(peers_c1, key=lambda cell: cell.p50_ms) if peers_c1 else None
    verdicts.append(
        at_most(
            "tabular, V2 JSON, c=1: p50 below every peer's" + (f" (best: {fastest.peer})" if fastest else ""),
            ours_c1.p50_ms if ours_c1 else None,
            fastest.p50_ms * 0.999999 if fastest else float("nan"),
            "p50 ms",
        )
    )
    ours_c32 = get(OURS, "tabular", "v2-json", c)
    best = best_peer(idx, ours_c32) if ours_c32 else None
    verdicts.append(
        at_least(
            f"tabular, V2 JSON, c={c}: ≥ 1.5x the best peer" + (f" ({best.peer})" if best else ""),
            _rps(ours_c32),
            _times(1.5, _rps(best)),
            "req/s",
        )
    )
    verdicts.append(
        at_most(
            f"tabular, V2 JSON, c={c}: frontend CPU ≤ {FRONTEND_CPU_LIMIT_US:.0f} µs/request",
            ours_c32.frontend_cpu_us if ours_c32 else None,
            FRONTEND_CPU_LIMIT_US,
            "µs/request",
        )
    )
    return verdicts


def _mlp_targets(get: Getter) -> list[Verdict]:
    c = TARGET_CONCURRENCY
    batched = get(OURS, "mlp", "v2-binary", c, True)
    plain = get(OURS, "mlp", "v2-binary", c)
    triton = get(TRITON, "mlp", "v2-binary", c, True)
    return [
        at_least(
            f"MLP, 1-row V2 binary, c={c}: batched ≥ 5x unbatched",
            _rps(batched),
            _times(5.0, _rps(plain)),
            "req/s",
        ),
        at_least(
            f"MLP, 1-row V2 binary, c={c}: mean executed batch ≥ 12 rows",
            batched.mean_batch_rows if batched else None,
            12.0,
            "rows",
        ),
        at_least(
            f"MLP, 1-row V2 binary, c={c}: ≥ 1.5x Triton's dynamic batcher",
            _rps(batched),
            _times(1.5, _rps(triton)),
            "req/s",
        ),
    ]


def evaluate_targets(cells: Iterable[Cell]) -> list[Verdict]:
    """Issue 12's targets, in its order, then issue 11's gRPC target."""
    idx = index(cells)

    def get(peer: str, model: str, path: str, conc: int, batching: bool = False) -> Cell | None:
        return find(idx, peer, model, path, conc, 1, batching)

    verdicts = _tabular_targets(get, idx) + _mlp_targets(get)
    verdicts.append(
        at_least(
            "CNN, V2 JSON, c=8: ≥ 2x MLServer in-process",
            _rps(get(OURS, "cnn", "v2-json", 8)),
            _times(2.0, _rps(get(MLS, "cnn", "v2-json", 8))),
            "req/s",
        )
    )
    c = TARGET_CONCURRENCY
    verdicts.append(  # issue 11
        at_least(
            f"tabular, c={c}: gRPC (h2load) ≥ REST V2 binary (wrk)",
            _rps(get(OURS, "tabular", "grpc", c)),
            _rps(get(OURS, "tabular", "v2-binary", c)),
            "req/s",
        )
    )
    return verdicts


# --- Markdown --------------------------------------------------------------------------


def fmt_num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10:
        return f"{value:.0f}x"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def fmt_bytes(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB" if value else "—"


def _path_label(cell: Cell) -> str:
    label = f"{cell.path} ({PATH_CLIENT.get(cell.path, '?')})"
    return label + " +batching" if cell.batching else label


def _sort_key(cell: Cell) -> tuple[int, bool, int, int, int]:
    path = PATH_ORDER.index(cell.path) if cell.path in PATH_ORDER else len(PATH_ORDER)
    peer = PEER_ORDER.index(cell.peer) if cell.peer in PEER_ORDER else len(PEER_ORDER)
    return (path, cell.batching, cell.concurrency, cell.batch, peer)


def fmt_optional(value: float | None) -> str:
    return "—" if value is None else fmt_num(value)


def model_table(cells: list[Cell], idx: dict[Key, Cell]) -> list[str]:
    lines = [
        "| path (client) | c | peer | req/s | rows/s | p50 ms | p99 ms | errors | mean batch | "
        "frontend CPU µs/req | ÷ best peer | ÷ ORT | busy elsewhere |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in sorted((c for c in cells if c.peer != ORT), key=_sort_key):
        if not cell.ok:
            what = "skipped" if cell.skipped else "failed"
            reason = (cell.error or "no data").removeprefix("skipped: ").splitlines()[0][:100]
            lines.append(
                f"| {_path_label(cell)} | {cell.concurrency} | {cell.peer} | {what}: {reason} "
                "| | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {_path_label(cell)} | {cell.concurrency} | {cell.peer} | {fmt_num(cell.rps)} | "
            f"{fmt_num(cell.rows_per_s)} | {fmt_num(cell.p50_ms)} | {fmt_num(cell.p99_ms)} | {cell.errors} | "
            f"{fmt_optional(cell.mean_batch_rows)} | {fmt_optional(cell.frontend_cpu_us)} | "
            f"{fmt_ratio(vs_best_peer(idx, cell))} | {fmt_ratio(vs_ort(idx, cell))} | {fmt_busy(cell)} |"
        )
    return lines


def fmt_busy(cell: Cell) -> str:
    text = f"{cell.busy_elsewhere_pct:.0f}%"
    return f"**{text}**" if cell.busy_elsewhere_pct > NOISY_PCT else text


def ort_table(cells: list[Cell]) -> list[str]:
    order = {name: i for i, name in enumerate(MODEL_ORDER)}
    rows = sorted((c for c in cells if c.peer == ORT), key=lambda c: (order.get(c.model, 99), c.batch))
    lines = [
        "| model | batch | calls/s | rows/s | p50 ms | p99 ms | busy elsewhere |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in rows:
        if cell.ok:
            lines.append(
                f"| {cell.model} | {cell.batch} | {fmt_num(cell.rps)} | {fmt_num(cell.rows_per_s)} | "
                f"{fmt_num(cell.p50_ms)} | {fmt_num(cell.p99_ms)} | {fmt_busy(cell)} |"
            )
        else:
            lines.append(f"| {cell.model} | {cell.batch} | failed: {(cell.error or '')[:80]} | | | | |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    versions = meta.get("versions", {})
    cells = cells_of(results)
    idx = index(cells)
    workers = int(settings.get("workers", 0))
    out: list[str] = [MD_START, f"## Results: {meta.get('date', '?')}", ""]
    out.append(
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('ram_gib', '?')} GiB RAM, {machine.get('os', '?')}."
    )
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    out.append(
        f"Settings: {settings.get('duration_s')} s per repetition, {settings.get('reps')} repetition(s) "
        f"(medians shown), {settings.get('warmup_s')} s warm-up, {workers} worker process(es) for every "
        f"server, batch {settings.get('batch')} per request, "
        + (
            f"concurrency sweep {settings['concurrency']}"
            if settings.get("concurrency")
            else "the cells the targets need (c per row)"
        )
        + (" (**quick smoke run: not for the record**)" if settings.get("quick") else "")
        + "."
    )
    out.append(f"Command: `{meta.get('command', '')}`")
    out.append("")
    peers = results.get("peers", {})
    out += [
        "| peer | what | started with | peak RSS (all processes) | peak PSS | processes |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in sorted(peers, key=lambda n: PEER_ORDER.index(n) if n in PEER_ORDER else 99):
        info = peers[name]
        memory = info.get("memory", {})
        status = "" if info.get("available", True) else " **not available**"
        started = ", ".join(f"{k}={v}" for k, v in info.get("settings_short", {}).items())
        out.append(
            f"| {name}{status} | {info.get('label', '')} | {started} | "
            f"{fmt_bytes(memory.get('rss_bytes', 0))} | {fmt_bytes(memory.get('pss_bytes', 0))} | "
            f"{memory.get('processes', 0) or '—'} |"
        )
    busy = {
        n: p["cpu_busy_before_pct"] for n, p in peers.items() if p.get("cpu_busy_before_pct", 0) > BUSY_PCT
    }
    if busy:
        out.append("")
        out.append(
            "**Warning:** the machine was busy before these peers started (CPU %): "
            + ", ".join(f"{n} {v:.0f}%" for n, v in busy.items())
            + "; other processes perturbed their numbers."
        )
    unavailable = [(n, p.get("note", "")) for n, p in peers.items() if not p.get("available", True)]
    for name, note in unavailable:
        out.append("")
        out.append(f"`{name}` not available: {note.splitlines()[0] if note else 'no reason recorded'}")
    out.append("")
    models = results.get("models", {})
    for model in MODEL_ORDER:
        model_cells = [c for c in cells if c.model == model and c.peer != ORT]
        if not model_cells:
            continue
        info = models.get(model, {})
        out += [f"### {model}: {info.get('description', '')}", ""]
        out += model_table(model_cells, idx)
        out.append("")
    ort_cells = [c for c in cells if c.peer == ORT]
    if ort_cells:
        out += ["### Raw onnxruntime in-process (one thread, no server: the limit)", ""]
        out += ort_table(ort_cells)
        out.append("")
    out += ["### Targets (issues 12 and 11)", "", "| target | measured | status |", "|---|---|---|"]
    for verdict in evaluate_targets(cells):
        out.append(f"| {verdict.target} | {verdict.measured} | {verdict.status} |")
    out.append("")
    out += NOTES
    out.append(MD_END)
    return "\n".join(out) + "\n"


NOTES = [
    "Notes:",
    "- wrk rows: closed loop, connections = concurrency, threads = min(2, c); wrk shares the 2 cores with "
    "the server. Errors = socket errors + timeouts + HTTP status ≥ 400.",
    "- Python-client rows (py-binary, py-shm): c client processes, one keep-alive connection each; every "
    "request includes the client's own copies (body build / shared-memory write, output copy-out). Compare "
    "py-shm with py-binary, not with wrk rows.",
    "- grpc rows (h2load): KServe V2 gRPC ModelInfer with raw_input_contents, every output named, the "
    "same framed message re-sent by h2load (C, HTTP/2 h2c) on c connections with one call in flight each, "
    "threads = min(2, c): measured as wrk measures REST, so comparable with the wrk rows. A gRPC error "
    "is HTTP 200 to h2load: each cell first checks one call's outputs with a real gRPC client, counts "
    "answers without a whole reply's DATA as errors, and (this server, Triton) checks the server's own "
    "success and failure counters against h2load's count.",
    "- py-grpc rows (only when asked for): c calls in flight from Python tritonclient.grpc processes "
    "(threads within each); the client's own CPU shares the 2 cores.",
    "- ÷ best peer divides this server's req/s by the fastest other server's on the same path, c and "
    "batching; ÷ ORT divides rows/s by raw onnxruntime's single-thread rows/s.",
    "- mean batch: rows per model execution over the timed repetitions (this server: "
    "model_server_batch_size_rows sum/count from /metrics; Triton: nv_inference_count / "
    "nv_inference_exec_count). frontend CPU µs/req: user+system CPU of this server's frontend processes "
    "over the repetitions ÷ requests completed.",
    "- busy elsewhere: CPU that processes other than the peer and the harness (and the hypervisor's "
    f"steal) took during the cell, as % of all cores; above {NOISY_PCT:.0f}% (bold) the cell's numbers "
    "are perturbed.",
    "- Peak RSS sums every process of a peer (shared pages counted once per process); PSS splits "
    "shared pages among the processes that map them.",
]


def replace_section(document: str, section: str) -> str:
    """Put ``section`` (which carries the markers) between the markers of ``document``, or append it."""
    start = document.find(MD_START)
    end = document.find(MD_END)
    if start == -1 or end == -1 or end < start:
        sep = (
            "" if not document or document.endswith("\n\n") else ("\n" if document.endswith("\n") else "\n\n")
        )
        return document + sep + section
    return document[:start] + section.rstrip("\n") + document[end + len(MD_END) :]


def summary_lines(results: dict[str, Any], printer: Callable[[str], None] = print) -> None:
    for verdict in evaluate_targets(cells_of(results)):
        printer(f"  [{verdict.status}] {verdict.target} — {verdict.measured}")
