"""The gRPC cell driven by h2load: the body, h2load's output and log, the guards against gRPC
errors passing for throughput, and (integration) one short cell against this server started
the way the bench starts it, its check call compared with an in-test onnxruntime run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import h2load
from bench.grpc_cell import GrpcCell, call_once, check_outputs, decode_outputs, hidden_errors, server_problem
from bench.models import REFERENCE_MODELS, build_models, layout_repository, sample_input
from bench.ort_options import session_options
from bench.peers import OurServer, PeerOptions
from bench.runner import RunSettings, run_cell
from bench.serverstats import RequestCounters, ours_grpc_requests, triton_requests
from bench.stats import Cell
from frontend.grpc import grpc_service_pb2 as pb
from tests.bench.conftest import running

SPEC = REFERENCE_MODELS["tabular"]

# Captured from h2load 1.52.0 against this server: tabular, c=8, 2 s.
STDOUT_OK = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration \
for measurements.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 2.01s, 1059.00 req/s, 147.85KB/s
requests: 2118 total, 2126 started, 2118 done, 2118 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 2118 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 295.70KB (302792) total, 6.79KB (6954) headers (space savings 95.95%), 171.67KB (175794) data
                     min         max         mean         sd        +/- sd
time for request:      856us    160.70ms      7.09ms      9.79ms    96.84%
"""
# The same against an unknown model: every answer a gRPC error (HTTP 200, no DATA).
STDOUT_ERRORS = """\
finished in 2.01s, 2206.50 req/s, 138.72KB/s
requests: 4413 total, 4421 started, 4413 done, 4413 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 4413 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 277.45KB (284108) total, 181.35KB (185698) headers (space savings 51.07%), 0B (0) data
"""
STDOUT_FAILED = """\
finished in 500ms, 30.00 req/s, 1.00KB/s
requests: 20 total, 25 started, 20 done, 15 succeeded, 5 failed, 3 errored, 1 timeout
status codes: 14 2xx, 1 3xx, 1 4xx, 0 5xx
traffic: 2KB (2048) total, 1KB (1024) headers (space savings 0.00%), 1.13KB (1162) data
"""
REPLY_FRAME = 83  # 175794 / 2118: the tabular reply, prefix included


def test_body_decodes_to_the_request(tmp_path: Path) -> None:
    payload = h2load.write_grpc_payload(SPEC, "tabular", 3, tmp_path)
    body = payload.body_file.read_bytes()
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5  # uncompressed, length
    assert h2load.unframe(body) == payload.message
    request = pb.ModelInferRequest.FromString(payload.message)
    assert request.model_name == "tabular" and len(request.inputs) == 1
    tensor = request.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("float_input", "FP32", [3, 30])
    assert not tensor.HasField("contents")  # raw_input_contents, as tritonclient sends
    rows = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(3, 30)
    np.testing.assert_array_equal(rows, sample_input(SPEC, 3))
    assert [o.name for o in request.outputs] == ["label", "probabilities"]
    for bad in (b"\x00\x00", body + b"x", b"\x01" + body[1:]):
        with pytest.raises(ValueError):
            h2load.unframe(bad)


def test_command(tmp_path: Path) -> None:
    cmd = h2load.h2load_command("127.0.0.1", 8002, tmp_path / "b", 32, 10, 30, tmp_path / "log")
    assert {"-c32", "-m1", "-t2", "-D10", "-N30"} <= set(cmd)
    assert cmd[cmd.index("-d") + 1] == str(tmp_path / "b")
    headers = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-H"]
    assert headers == ["content-type: application/grpc", "te: trailers"]
    assert cmd[cmd.index("--log-file") + 1] == str(tmp_path / "log")
    assert cmd[-1] == "http://127.0.0.1:8002/inference.GRPCInferenceService/ModelInfer"
    assert [h2load.h2load_threads(c) for c in (1, 8, 32)] == [1, 2, 2]


def test_stdout_and_log_parsing() -> None:
    summary = h2load.parse_stdout(STDOUT_OK)
    assert (summary.total, summary.started, summary.done, summary.succeeded) == (2118, 2126, 2118, 2118)
    assert summary.finished_s == pytest.approx(2.01) and summary.requests_per_s == pytest.approx(1059.0)
    assert summary.status == {"2xx": 2118, "3xx": 0, "4xx": 0, "5xx": 0}
    assert summary.data_bytes == 175794
    log = h2load.parse_log("1796294289510900\t200\t8764\n1796294289510940\t200\t9250\nbad line\n1\t503\t10\n")
    assert log == [(1796294289510900, 200, 8764), (1796294289510940, 200, 9250), (1, 503, 10)]
    lines = [(0, 200, us) for us in range(1000, 101_000, 1000)]  # 1..100 ms
    rep = h2load.to_rep(summary, [*lines, (0, 500, 999_000)])  # non-2xx lines are not latencies
    assert rep.requests == 2118 and rep.errors == 0 and rep.rps == pytest.approx(2118 / 2.01)
    assert (rep.p50_ms, rep.p90_ms, rep.p99_ms, rep.max_ms) == (50.0, 90.0, 99.0, 100.0)
    assert rep.mean_ms == pytest.approx(50.5)
    failed = h2load.to_rep(h2load.parse_stdout(STDOUT_FAILED), [])
    assert failed.duration_s == pytest.approx(0.5) and failed.requests == 14  # 3xx is no success
    assert failed.error_detail == {"status": 2, "errored": 2, "timeout": 1} and failed.errors == 5
    with pytest.raises(h2load.H2loadError):
        h2load.parse_stdout("connect to 127.0.0.1:1 failed")


def test_error_answers_without_data_are_errors() -> None:
    assert hidden_errors(h2load.parse_stdout(STDOUT_OK), REPLY_FRAME) == 0
    assert hidden_errors(h2load.parse_stdout(STDOUT_ERRORS), REPLY_FRAME) == 4413
    assert hidden_errors(h2load.parse_stdout(STDOUT_FAILED), REPLY_FRAME) == 0  # 1162 = 14 x 83


def test_server_counters_guard() -> None:
    metrics = (
        'model_server_requests_total{model="tabular",protocol="grpc",status="200",version="1"} 2124.0\n'
        'model_server_requests_total{model="tabular",protocol="grpc",status="500",version="1"} 1.0\n'
        'model_server_requests_total{model="tabular",protocol="v2",status="200",version="1"} 50.0\n'
        'model_server_requests_total{model="other",protocol="grpc",status="400",version="1"} 9.0\n'
    )
    assert ours_grpc_requests(metrics, "tabular") == RequestCounters(2124.0, 1.0)
    triton = 'nv_inference_request_success{model="tabular",version="1"} 7\n'
    triton += 'nv_inference_request_failure{model="tabular",version="1"} 2\n'
    assert triton_requests(triton, "tabular") == RequestCounters(7.0, 2.0)
    run = h2load.Run(h2load.parse_stdout(STDOUT_OK), h2load.to_rep(h2load.parse_stdout(STDOUT_OK), []))
    zero = RequestCounters(0.0, 0.0)
    assert server_problem(zero, RequestCounters(2124.0, 1.0), [run]) is None  # 1 cancelled at the end
    assert server_problem(zero, RequestCounters(2124.0, 9.0), [run]) is not None  # 8 abandoned only
    assert server_problem(zero, RequestCounters(2000.0, 0.0), [run]) is not None  # fewer than counted
    assert server_problem(None, None, [run]) is None  # a peer that does not count


def test_outputs_decode_raw_and_typed() -> None:
    response = pb.ModelInferResponse(model_name="tabular")
    label = response.outputs.add(name="label", datatype="INT64", shape=[2])
    probabilities = response.outputs.add(name="probabilities", datatype="FP32", shape=[2, 2])
    response.raw_output_contents.append(np.array([1, 0], dtype="<i8").tobytes())
    response.raw_output_contents.append(np.array([0.2, 0.8, 0.6, 0.4], dtype="<f4").tobytes())
    arrays = decode_outputs(response)
    np.testing.assert_array_equal(arrays["label"], [1, 0])
    assert arrays["probabilities"].shape == (2, 2) and check_outputs(SPEC, 2, arrays) is None
    del response.raw_output_contents[:]
    label.contents.int64_contents.extend([1, 0])
    probabilities.contents.fp32_contents.extend([0.2, 0.8, 0.6, 0.4])
    assert np.array_equal(decode_outputs(response)["label"], [1, 0])
    assert check_outputs(SPEC, 3, arrays) is not None  # wrong batch
    assert check_outputs(SPEC, 2, {"label": arrays["label"]}) is not None  # an output missing
    assert (
        check_outputs(SPEC, 2, arrays | {"label": arrays["label"].reshape(2, 1)}) is None
    )  # MLServer's [N, 1]


# --- against this server --------------------------------------------------------------

needs_h2load = pytest.mark.skipif(
    h2load.h2load_path() is None, reason="h2load not installed (nghttp2-client)"
)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"), ["tabular"])["tabular"]


@pytest.fixture
def ours(tmp_path: Path, tabular: Path) -> Iterator[OurServer]:
    repository = layout_repository({"tabular": tabular}, tmp_path / "repository")
    yield from running(OurServer(tmp_path, PeerOptions(workers=1, frontends=1), repository, ["tabular"]))


@pytest.mark.integration
@needs_h2load
def test_grpc_cell_against_this_server(ours: OurServer, tabular: Path, tmp_path: Path) -> None:
    payload = h2load.write_grpc_payload(SPEC, "tabular", 2, tmp_path)
    reply = call_once(ours.grpc_port, payload.message, 20.0)
    arrays = decode_outputs(pb.ModelInferResponse.FromString(reply))
    session = ort.InferenceSession(str(tabular), session_options(), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {SPEC.input.name: payload.array})
    np.testing.assert_array_equal(arrays["label"], label)
    np.testing.assert_allclose(arrays["probabilities"], probabilities, rtol=1e-6)

    before = ours.grpc_request_counters("tabular")
    cell = Cell("ours", "tabular", "grpc", 4, served_as="tabular")
    run_cell(ours, cell, RunSettings(duration_s=1.0, reps=1, warmup_s=0.0, results_dir=tmp_path), {})
    after = ours.grpc_request_counters("tabular")
    assert cell.ok, cell.error
    assert cell.client.startswith("h2load ") and cell.errors == 0 and cell.reps[0].requests > 0
    assert before is not None and after is not None
    assert after.success - before.success >= cell.reps[0].requests + 1  # + the cell's check call
    assert cell.frontend_cpu_us is not None and cell.mean_batch_rows == pytest.approx(1.0)

    # An unknown model: every answer is a gRPC error; none may count as a request.
    wrong = Cell("ours", "tabular", "grpc", 4, served_as="no_such_model")
    run_cell(ours, wrong, RunSettings(duration_s=1.0, reps=1, warmup_s=0.0, results_dir=tmp_path), {})
    assert not wrong.ok and wrong.error is not None and "NOT_FOUND" in wrong.error
    body = h2load.write_grpc_payload(SPEC, "no_such_model", 2, tmp_path)
    run = GrpcCell(ours, wrong, body, len(h2load.frame(reply)), tmp_path / "h2load.log", 20.0).run(1.0)
    assert run.summary.succeeded > 0  # h2load's own count: HTTP 200s
    assert run.rep.requests == 0 and run.rep.error_detail["grpc_status"] == run.summary.succeeded
