"""The ``grpc`` cell: h2load (:mod:`bench.h2load`) against a peer's gRPC port, guarded so that
gRPC errors cannot pass for throughput.

A failed gRPC call is an HTTP 200 with a non-zero ``grpc-status``, a success to h2load.
Three guards:

1. Pre-flight: the exact body bytes h2load will send go once through a real gRPC client
   (``grpc`` unary call, raw bytes in and out); the ``ModelInferResponse`` must hold every
   output with the expected shape. Its size gives the reply frame length.
2. Every repetition: an error answer is trailers-only (no DATA), and identical requests
   get identical replies, so the DATA bytes h2load received must cover one reply frame
   per counted success; the shortfall is counted as errors, not requests.
3. Around the repetitions, where the server counts calls (this server: ``/metrics``
   ``model_server_requests_total{protocol="grpc"}``; Triton: ``nv_inference_request_*``):
   it must have answered at least h2load's successes, and have failed no more calls than
   h2load abandoned in flight when each repetition ended (cancelled calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench import h2load
from bench.models import REFERENCE_MODELS, ReferenceModel
from bench.peers import HOST, Peer
from bench.serverstats import RequestCounters
from bench.stats import Cell, Rep
from frontend.grpc import grpc_service_pb2 as pb

# datatype -> (numpy dtype of raw contents, typed ``InferTensorContents`` field)
DATATYPES: dict[str, tuple[str, str]] = {
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "INT64": ("<i8", "int64_contents"),
    "INT32": ("<i4", "int_contents"),
    "BOOL": ("?", "bool_contents"),
}


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as arrays, from ``raw_output_contents`` or typed contents."""
    arrays: dict[str, np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        if output.datatype not in DATATYPES:
            raise ValueError(f"output {output.name!r}: datatype {output.datatype!r} not handled")
        dtype, field = DATATYPES[output.datatype]
        shape = tuple(int(dim) for dim in output.shape)
        if response.raw_output_contents:
            flat = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        else:
            flat = np.asarray(getattr(output.contents, field), dtype=dtype)
        arrays[output.name] = flat.reshape(shape)
    return arrays


def check_outputs(model: ReferenceModel, batch: int, arrays: dict[str, np.ndarray]) -> str | None:
    """None when every output of ``model`` is there with its shape, else what is wrong. Axes of
    size 1 aside: MLServer answers a 1-D output as [N, 1]."""
    for output in model.outputs:
        if output.name not in arrays:
            return f"no output {output.name!r} (got {sorted(arrays)})"
        want = model.output_shape(output, batch)
        if _squeezed(arrays[output.name].shape) != _squeezed(want):
            return f"output {output.name!r} has shape {arrays[output.name].shape}, expected {want}"
    return None


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dim for dim in shape if dim != 1)


def call_once(port: int, message: bytes, timeout_s: float) -> bytes:
    """One ModelInfer call with the serialized request; the serialized response."""
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        infer = channel.unary_unary(h2load.INFER_PATH, request_serializer=None, response_deserializer=None)
        try:
            reply: bytes = infer(message, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise RuntimeError(f"check call failed: {exc.code().name}: {exc.details()}") from None
    return reply


def preflight(port: int, payload: h2load.GrpcPayload, model: ReferenceModel, timeout_s: float) -> bytes:
    """The check call (guard 1); returns the serialized response."""
    reply = call_once(port, payload.message, timeout_s)
    problem = check_outputs(
        model, payload.array.shape[0], decode_outputs(pb.ModelInferResponse.FromString(reply))
    )
    if problem:
        raise RuntimeError(f"check call failed: {problem}")
    return reply


def hidden_errors(summary: h2load.Summary, reply_frame_bytes: int) -> int:
    """2xx answers without a whole reply's DATA: gRPC errors h2load counted as successes (guard 2)."""
    answered = summary.succeeded - summary.status["3xx"]
    return max(0, answered - summary.data_bytes // reply_frame_bytes)


def count_hidden(run: h2load.Run, reply_frame_bytes: int) -> Rep:
    """``run``'s Rep with guard 2's errors moved from the requests to the errors."""
    rep = run.rep
    hidden = hidden_errors(run.summary, reply_frame_bytes)
    if hidden:
        rep.requests -= hidden
        rep.errors += hidden
        rep.error_detail["grpc_status"] = hidden
    return rep


def server_problem(
    before: RequestCounters | None, after: RequestCounters | None, runs: list[h2load.Run]
) -> str | None:
    """Guard 3: what the server counted against what h2load did; None when consistent or unknown."""
    if before is None or after is None:
        return None
    counted = sum(run.rep.requests for run in runs)
    abandoned = sum(run.summary.started - run.summary.done for run in runs)
    succeeded, failed = after.success - before.success, after.failure - before.failure
    if succeeded < counted:
        return f"the server answered {succeeded:.0f} calls successfully, h2load counted {counted}"
    if failed > abandoned:
        return f"the server failed {failed:.0f} calls (h2load abandoned {abandoned} in flight at the ends)"
    return None


@dataclass
class GrpcCell:
    """One prepared gRPC cell: the body on disk, checked once, and how to run h2load on it."""

    peer: Peer
    cell: Cell
    payload: h2load.GrpcPayload
    reply_frame_bytes: int
    log_file: Path
    timeout_s: float

    @classmethod
    def prepare(cls, peer: Peer, cell: Cell, work_dir: Path, timeout_s: float) -> GrpcCell:
        model = REFERENCE_MODELS[cell.model]
        payload = h2load.write_grpc_payload(
            model, cell.served_as or cell.model, cell.batch, work_dir / "bodies"
        )
        reply = preflight(peer.grpc_port, payload, model, timeout_s)
        log_file = work_dir / "h2load" / f"{peer.name}-{cell.served_as}-c{cell.concurrency}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        cell.client = f"h2load {h2load.h2load_version()}, {h2load.h2load_threads(cell.concurrency)} thread(s)"
        return cls(peer, cell, payload, len(h2load.frame(reply)), log_file, timeout_s)

    def run(self, duration_s: float) -> h2load.Run:
        command = h2load.h2load_command(
            HOST,
            self.peer.grpc_port,
            self.payload.body_file,
            self.cell.concurrency,
            duration_s,
            self.timeout_s,
            self.log_file,
        )
        run = h2load.run_h2load(command, self.log_file, duration_s, self.timeout_s)
        count_hidden(run, self.reply_frame_bytes)
        return run

    def counters(self) -> RequestCounters | None:
        try:
            return self.peer.grpc_request_counters(self.cell.served_as or self.cell.model)
        except (OSError, ValueError):
            return None
