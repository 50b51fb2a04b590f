"""h2load as the gRPC load generator, as wrk is for REST: the body, the command, the parsing.

h2load (nghttp2) is a C HTTP/2 load generator. A gRPC unary call is an HTTP/2 POST
whose body is one length-prefixed message (1 byte compressed flag, 4-byte big-endian
length, the serialized protobuf), so h2load re-sending a fixed body file to
``/inference.GRPCInferenceService/ModelInfer`` is what ``tritonclient.grpc`` sends, minus
the client's own CPU. ``-c`` connections each with ``-m1`` (one call in flight) make a
closed loop like wrk's connections; ``http://`` is h2c with prior knowledge.

gRPC errors are HTTP 200 with a non-zero ``grpc-status`` trailer, which h2load counts as
success; :mod:`bench.grpc_cell` guards against that. Here: the successful responses'
DATA bytes, which a trailers-only error answer does not have, are reported so the cell
can check that every counted response carried a whole reply.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.loadgen import tool_version
from bench.models import ReferenceModel, sample_input
from bench.stats import Rep, percentile
from frontend.grpc import grpc_service_pb2 as pb

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
INSTALL_HINT = (
    "h2load is not installed. Install it from Debian/Ubuntu packages:\n"
    "    sudo apt-get install -y nghttp2-client\n"
    "(macOS: brew install nghttp2)"
)
_PREFIX = struct.Struct(">BI")  # gRPC message framing: compressed flag, length


class H2loadError(RuntimeError):
    pass


def h2load_path() -> str | None:
    return shutil.which("h2load")


def h2load_version() -> str:
    return tool_version("h2load", r"nghttp2/(\S+)")


def h2load_threads(concurrency: int, max_threads: int = 2) -> int:
    return max(1, min(max_threads, concurrency))


# --- the body -------------------------------------------------------------------------


def infer_request(model: ReferenceModel, model_id: str, array: np.ndarray) -> pb.ModelInferRequest:
    """The request ``tritonclient.grpc`` builds: the input as ``raw_input_contents``
    (little-endian bytes), every output asked for by name."""
    request = pb.ModelInferRequest(model_name=model_id)
    tensor = request.inputs.add()
    tensor.name = model.input.name
    tensor.datatype = model.input.datatype
    tensor.shape.extend(array.shape)
    for output in model.outputs:
        request.outputs.add().name = output.name
    request.raw_input_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return request


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return _PREFIX.pack(0, len(message)) + message


def unframe(body: bytes) -> bytes:
    """The message of a body holding exactly one uncompressed length-prefixed message."""
    if len(body) < _PREFIX.size:
        raise ValueError(f"{len(body)} bytes: shorter than the 5-byte gRPC prefix")
    flag, length = _PREFIX.unpack_from(body)
    if flag != 0 or len(body) != _PREFIX.size + length:
        raise ValueError(f"not one uncompressed message: flag {flag}, length {length}, body {len(body)}")
    return body[_PREFIX.size :]


@dataclass(frozen=True)
class GrpcPayload:
    body_file: Path  # the framed message h2load sends
    message: bytes  # the serialized ModelInferRequest (what a gRPC client sends)
    array: np.ndarray  # the input rows


def write_grpc_payload(model: ReferenceModel, model_id: str, batch: int, out_dir: Path) -> GrpcPayload:
    array = sample_input(model, batch)
    message = infer_request(model, model_id, array).SerializeToString()
    out_dir.mkdir(parents=True, exist_ok=True)
    body_file = out_dir / f"{model_id}-grpc-b{batch}.body"
    body_file.write_bytes(frame(message))
    return GrpcPayload(body_file, message, array)


# --- running --------------------------------------------------------------------------


def h2load_command(
    host: str,
    port: int,
    body_file: Path,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    log_file: Path,
) -> list[str]:
    return [
        h2load_path() or "h2load",
        f"-c{concurrency}",
        "-m1",
        f"-t{h2load_threads(concurrency)}",
        f"-D{max(1, round(duration_s))}",
        f"-N{max(1, round(timeout_s))}",  # a connection silent this long: its calls time out
        "-d",
        str(body_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log_file),
        f"http://{host}:{port}{INFER_PATH}",
    ]


@dataclass(frozen=True)
class Summary:
    """What h2load printed about one run."""

    finished_s: float
    requests_per_s: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]  # "2xx".."5xx"
    data_bytes: int  # DATA frame payload received, gRPC prefixes included


@dataclass
class Run:
    """One h2load run: its summary, per-request latencies of the 2xx answers, and a Rep."""

    summary: Summary
    rep: Rep


def run_h2load(command: list[str], log_file: Path, duration_s: float, timeout_s: float) -> Run:
    log_file.unlink(missing_ok=True)
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=duration_s + timeout_s + 30
    )
    if result.returncode != 0:
        raise H2loadError(
            f"h2load exited {result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}"
        )
    summary = parse_stdout(result.stdout)
    log_text = log_file.read_text() if log_file.exists() else ""
    return Run(summary, to_rep(summary, parse_log(log_text)))


# --- parsing --------------------------------------------------------------------------

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_DATA = re.compile(r"traffic: .*?\S+ \((\d+)\) data")


def parse_stdout(text: str) -> Summary:
    finished, requests, status, data = (p.search(text) for p in (_FINISHED, _REQUESTS, _STATUS, _DATA))
    if finished is None or requests is None or status is None or data is None:
        raise H2loadError(f"cannot parse h2load output:\n{text[-800:]}")
    total, started, done, succeeded, failed, errored, timeout = (int(v) for v in requests.groups())
    return Summary(
        finished_s=float(finished.group(1)) * _UNITS_S[finished.group(2)],
        requests_per_s=float(finished.group(3)),
        total=total,
        started=started,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(v) for v in status.groups()), strict=True)),
        data_bytes=int(data.group(1)),
    )


def parse_log(text: str) -> list[tuple[int, int, int]]:
    """``--log-file`` lines: (start µs since the epoch, HTTP status, µs to the end of the response)."""
    entries: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        try:
            entries.append((int(fields[0]), int(fields[1]), int(fields[2])))
        except ValueError:
            continue
    return entries


def to_rep(summary: Summary, log: list[tuple[int, int, int]]) -> Rep:
    """A repetition: completed calls are h2load's successes (HTTP 2xx answers, whatever their
    ``grpc-status``: the cell checks that), latencies from the log's 2xx lines."""
    latencies = sorted(elapsed / 1e3 for _, status, elapsed in log if 200 <= status < 300)
    # h2load's "failed" includes non-2xx/3xx answers and "errored" (resets, timeouts).
    detail = {
        "status": summary.status["3xx"] + summary.status["4xx"] + summary.status["5xx"],
        "errored": summary.errored - summary.timeout,
        "timeout": summary.timeout,
    }
    return Rep(
        requests=summary.succeeded - summary.status["3xx"],
        duration_s=summary.finished_s,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        mean_ms=sum(latencies) / len(latencies) if latencies else float("nan"),
        max_ms=latencies[-1] if latencies else float("nan"),
        errors=sum(detail.values()),
        error_detail=detail,
    )
