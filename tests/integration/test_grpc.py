"""KServe V2 / Triton gRPC (``inference.GRPCInferenceService``), judged by tritonclient.grpc
against the real stack; every inference is compared with an in-test onnxruntime run."""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import models
from tests.models import ort_run

from .readme_examples import README, fraud_expected, printed_numbers
from .regions import client_region
from .server import Server, started

pytestmark = pytest.mark.integration

ADMIN = "adm-" + secrets.token_hex(16)
INFER = "inf-" + secrets.token_hex(16)
MESSAGE_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def gserver(repository: Path) -> Iterator[Server]:
    srv = Server(
        repository,
        workers=2,
        MODEL_SERVER_ALLOW_CLIENT_SHM="true",
        MODEL_SERVER_GRPC_MAX_MESSAGE_BYTES=MESSAGE_LIMIT,
        MODEL_SERVER_GRPC_STREAM_IDLE_S=2,
        MODEL_SERVER_ALLOWED_LOCAL_ROOTS=repository.parent,
    )
    with started(srv, ["linear", "multi", "types"]):
        yield srv


@pytest.fixture
def client(gserver: Server) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(url=gserver.grpc_url)
    try:
        yield c
    finally:
        c.close()


def _input(name: str, array: np.ndarray) -> tg.InferInput:
    inp = tg.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array)
    return inp


def _code(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def test_health_metadata_and_config(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("linear", "1") and client.is_model_ready("linear")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "model-server"
    assert "system_shared_memory" in meta["extensions"] and "model_repository" in meta["extensions"]
    model = client.get_model_metadata("linear", "1", as_json=True)
    assert model["name"] == "linear" and model["platform"] == "onnxruntime_onnx"
    assert {"1", "2"} >= set(model["versions"]) >= {"1"}
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [("x", "FP32", ["-1", "3"])]
    config = client.get_model_config("linear", "1", as_json=True)["config"]
    assert config["name"] == "linear" and config["backend"] == "onnxruntime"
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("x", "TYPE_FP32")]


def test_infer_fp32_raw_and_request_id(client: tg.InferenceServerClient, repository: Path) -> None:
    x = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    result = client.infer("linear", [_input("x", x)], model_version="1", request_id="r-42")
    assert result.get_response().id == "r-42"
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    # Output selection: only what was asked comes back.
    only = client.infer("linear", [_input("x", x)], outputs=[tg.InferRequestedOutput("label")])
    assert [o.name for o in only.get_response().outputs] == ["label"]
    np.testing.assert_array_equal(only.as_numpy("label"), expected["label"])
    assert only.as_numpy("scores") is None


def test_infer_typed_contents(client: tg.InferenceServerClient, gserver: Server, repository: Path) -> None:
    """Tensors as InferTensorContents (what KServe's clients may send) rather than raw bytes."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    feeds = models.multi_feeds()
    expected = ort_run(repository / "multi" / "1" / "model.onnx", feeds)
    request = pb.ModelInferRequest(model_name="multi")
    fields = {
        "count": "int64_contents",
        "amount": "fp32_contents",
        "flag": "bool_contents",
        "tag": "bytes_contents",
    }
    for name, array in feeds.items():
        tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        getattr(tensor.contents, fields[name]).extend(array.reshape(-1).tolist())
    with grpc.insecure_channel(gserver.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    result = tg.InferResult(response)
    np.testing.assert_allclose(result.as_numpy("total"), expected["total"])
    np.testing.assert_array_equal(result.as_numpy("not_flag"), expected["not_flag"])
    assert [t.decode() for t in result.as_numpy("tag_out").reshape(-1)] == ["a", "", "ünï"]


def test_int64_bool_bytes_and_every_datatype(client: tg.InferenceServerClient, repository: Path) -> None:
    feeds = models.multi_feeds()
    expected = ort_run(repository / "multi" / "1" / "model.onnx", feeds)
    result = client.infer("multi", [_input(n, v) for n, v in feeds.items()])
    np.testing.assert_allclose(result.as_numpy("total"), expected["total"])
    np.testing.assert_array_equal(result.as_numpy("not_flag"), expected["not_flag"])
    assert [t.decode() for t in result.as_numpy("tag_out").reshape(-1)] == ["a", "", "ünï"]
    arrays = models.datatype_arrays()
    typed = {f"in_{k}": v for k, v in arrays.items()}
    want = ort_run(repository / "types" / "1" / "model.onnx", typed)
    got = client.infer("types", [_input(n, v) for n, v in typed.items()])
    for k in arrays:
        out = got.as_numpy(f"out_{k}")
        assert out.dtype == want[f"out_{k}"].dtype, k
        np.testing.assert_array_equal(out, want[f"out_{k}"], err_msg=k)


def test_stream_infer(client: tg.InferenceServerClient, repository: Path) -> None:
    """ModelStreamInfer: answers in order; a bad request answers with its error, the stream goes on."""
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    got: list[tuple[Any, Any]] = []
    client.start_stream(callback=lambda result, error: got.append((result, error)))
    try:
        client.async_stream_infer("linear", [_input("x", x)], request_id="s1")
        client.async_stream_infer("linear", [_input("x", x.astype(np.float64))], request_id="s2")
        client.async_stream_infer("linear", [_input("x", x)], request_id="s3")
    finally:
        client.stop_stream()  # waits for the responses
    assert len(got) == 3
    assert got[0][1] is None and got[2][1] is None
    for result, _ in (got[0], got[2]):
        np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    assert [got[0][0].get_response().id, got[2][0].get_response().id] == ["s1", "s3"]
    assert "datatype FP64 does not match" in got[1][1].message()


def test_an_idle_stream_is_closed(gserver: Server) -> None:
    """A stream that sends nothing does not hold one of the concurrent RPCs for ever."""
    from tritonclient.grpc import service_pb2_grpc

    release = threading.Event()

    def nothing() -> Iterator[Any]:
        release.wait(60)  # sends no request; ends once the test is done
        yield from ()

    with grpc.insecure_channel(gserver.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.ModelStreamInfer(nothing(), timeout=60))
        finally:
            release.set()
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "MODEL_SERVER_GRPC_STREAM_IDLE_S" in str(exc.value.details())


def test_classification(client: tg.InferenceServerClient, repository: Path) -> None:
    x = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    scores = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})["scores"]
    top = tg.InferRequestedOutput("scores", class_count=1)
    got = client.infer("linear", [_input("x", x)], outputs=[top]).as_numpy("scores")
    assert got.shape == (5, 1)
    for row, (cell,) in zip(scores, got, strict=True):
        value, index = cell.decode().split(":")
        assert int(index) == int(np.argmax(row))
        assert float(value) == pytest.approx(float(row.max()), abs=1e-6)


def _region(client: tg.InferenceServerClient, name: str, size: int) -> contextlib.AbstractContextManager[Any]:
    return client_region(client, name, size, "grpc")


def test_shared_memory_inputs_and_outputs(client: tg.InferenceServerClient, repository: Path) -> None:
    x = np.random.default_rng(9).normal(size=(6, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    scores_size = expected["scores"].nbytes
    with (
        _region(client, "gin0", x.nbytes) as in_handle,
        _region(client, "gout0", scores_size + 64) as out_handle,
    ):
        shm.set_shared_memory_region(in_handle, [x])
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert int(status["gin0"]["byte_size"]) == x.nbytes
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory("gin0", x.nbytes)
        out = tg.InferRequestedOutput("scores")
        out.set_shared_memory("gout0", scores_size)
        result = client.infer("linear", [inp], outputs=[out, tg.InferRequestedOutput("label")])
        meta = result.get_output("scores")
        assert meta.parameters["shared_memory_region"].string_param == "gout0"
        got = shm.get_contents_as_numpy(out_handle, np.float32, [6, 2])
        np.testing.assert_allclose(got, expected["scores"], rtol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        too_small = tg.InferRequestedOutput("scores")
        too_small.set_shared_memory("gout0", 8)
        with pytest.raises(InferenceServerException, match="needs 48 bytes") as exc:
            client.infer("linear", [inp], outputs=[too_small])
        assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="not registered"):
        client.infer("linear", [inp])
    with pytest.raises(InferenceServerException, match="does not exist") as exc:
        client.register_system_shared_memory("ghost", "/ms_no_such_region", 64)
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"


def test_repository_index_load_unload(client: tg.InferenceServerClient, repository: Path) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("linear", "1")].state == "READY"
    assert index[("credit", "1")].state == "UNAVAILABLE"
    client.load_model("credit")
    assert client.is_model_ready("credit", "1")
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    name = client.get_model_metadata("credit").inputs[0].name
    result = client.infer("credit", [_input(name, x)])
    expected = ort_run(repository / "credit" / "1" / "model.onnx", {name: x})
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    client.unload_model("credit")
    assert not client.is_model_ready("credit")
    with pytest.raises(InferenceServerException, match="'credit' is not loaded") as exc:
        client.unload_model("credit")
    assert _code(exc) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="model name") as exc:
        client.load_model("bad/name")
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match=r"parameters\.config is not JSON"):
        client.load_model("credit", config="{nope")


def test_errors_carry_the_servers_message_and_status(client: tg.InferenceServerClient) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    cases: list[tuple[Any, str, str]] = [
        (lambda: client.infer("no_such_model", [_input("x", x)]), "not loaded", "NOT_FOUND"),
        (lambda: client.get_model_metadata("no_such_model"), "not loaded", "NOT_FOUND"),
        (
            lambda: client.infer("linear", [_input("x", x.astype(np.float64))]),
            "datatype FP64 does not match",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: client.infer("linear", [_input("x", np.ones((2, 4), np.float32))]),
            "shape",
            "INVALID_ARGUMENT",
        ),
        (
            lambda: client.infer("linear", [_input("x", x)], outputs=[tg.InferRequestedOutput("nope")]),
            "unexpected inference output 'nope'",
            "INVALID_ARGUMENT",
        ),
        (client.get_cuda_shared_memory_status, "", "UNIMPLEMENTED"),
    ]
    for call, message, code in cases:
        with pytest.raises(InferenceServerException, match=message or None) as exc:
            call()
        assert _code(exc) == f"StatusCode.{code}", exc.value
    # Raw bytes that do not match the shape: a clear 400, and the server keeps serving.
    bad = _input("x", x)
    bad._raw_content = b"\x00" * 5
    with pytest.raises(InferenceServerException, match="5 bytes of data do not match") as exc:
        client.infer("linear", [bad])
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("linear", [_input("x", x)]).as_numpy("scores").shape == (2, 2)


def test_message_bound_and_deadline(gserver: Server, repository: Path) -> None:
    """A message over MODEL_SERVER_GRPC_MAX_MESSAGE_BYTES is refused by gRPC itself, and the
    server keeps serving; a call with a deadline runs within it."""
    with contextlib.closing(tg.InferenceServerClient(url=gserver.grpc_url)) as c:
        huge = np.zeros((MESSAGE_LIMIT // 12 + 1, 3), dtype=np.float32)
        with pytest.raises(InferenceServerException) as exc:
            c.infer("linear", [_input("x", huge)])
        assert _code(exc) == "StatusCode.RESOURCE_EXHAUSTED"
        x = np.ones((2, 3), dtype=np.float32)
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
        got = c.infer("linear", [_input("x", x)], client_timeout=30).as_numpy("scores")
        np.testing.assert_allclose(got, expected["scores"], rtol=1e-6)


def test_grpc_health_checking_protocol(gserver: Server) -> None:
    with grpc.insecure_channel(gserver.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "live"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as exc:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_and_statistics_count_grpc_requests(
    client: tg.InferenceServerClient, gserver: Server
) -> None:
    before = client.get_inference_statistics("linear", "1", as_json=True)["model_stats"][0]
    x = np.ones((2, 3), dtype=np.float32)
    for _ in range(3):
        client.infer("linear", [_input("x", x)])
    after = client.get_inference_statistics("linear", "1", as_json=True)["model_stats"][0]
    assert (after["name"], after["version"]) == ("linear", "1")
    # Protobuf's JSON leaves out zero values: a model not used yet has no counts at all.
    success = int(after["inference_stats"]["success"].get("count", 0)) - int(
        before.get("inference_stats", {}).get("success", {}).get("count", 0)
    )
    assert success == 3
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3 * 2
    everything = {
        (m["name"], m["version"]) for m in client.get_inference_statistics(as_json=True)["model_stats"]
    }
    assert {("linear", "1"), ("multi", "1"), ("types", "1")} <= everything
    text = gserver.client.get("/metrics").text
    assert re.search(r'model_server_requests_total\{[^}]*protocol="grpc"[^}]*\} [1-9]', text), text[:3000]


def _grpc_statuses(gserver: Server, model: str) -> dict[str, float]:
    """``model_server_requests_total`` over gRPC for ``model``, by status label."""
    labels = rf'model="{model}"[^}}]*protocol="grpc"[^}}]*status="(\d+)"'
    pattern = rf"model_server_requests_total\{{[^}}]*{labels}[^}}]*\}} (\S+)"
    return {m[1]: float(m[2]) for m in re.finditer(pattern, gserver.client.get("/metrics").text)}


def test_a_cancelled_call_counts_as_cancelled_not_as_a_server_error(gserver: Server) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    r = gserver.client.post("/v1/models/load", json={"model_id": "slow", "version": "1"})
    assert r.status_code == 200, r.text
    try:
        x = np.ones((320, 1024), dtype=np.float32)  # ~2 s of compute on one core
        request = service_pb2.ModelInferRequest(model_name="slow")
        request.inputs.add(name="x", datatype="FP32", shape=[320, 1024])
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(gserver.grpc_url) as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=60)
            time.sleep(0.5)  # running on a worker by now
            assert call.cancel()
        deadline = time.monotonic() + 15
        statuses = _grpc_statuses(gserver, "slow")
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.1)
            statuses = _grpc_statuses(gserver, "slow")
        assert statuses == {"499": 1.0}
    finally:
        gserver.client.delete("/v1/models/slow/1")


def test_readme_grpc_example_runs(gserver: Server, repository: Path) -> None:
    """The README's gRPC example (fenced ```python grpc) runs as written and prints ORT's answer."""
    blocks = re.findall(r"```python grpc\n(.*?)```", README.read_text(), re.S)
    assert blocks
    loaded = gserver.client.post("/v1/models/load", json={"model_id": "fraud_detection", "version": "2.0.0"})
    assert loaded.status_code == 200, loaded.text
    values, _ = printed_numbers("\n".join(blocks).replace("localhost:8002", gserver.grpc_url))
    np.testing.assert_allclose(values, fraud_expected(repository), rtol=1e-5)


# --- access control ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(repository: Path) -> Iterator[Server]:
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_ADMIN_TOKENS=ADMIN,
        MODEL_SERVER_INFERENCE_TOKENS=INFER,
        MODEL_SERVER_ALLOWED_LOCAL_ROOTS=repository.parent,
    )
    with started(srv, ["linear"], headers={"Authorization": f"Bearer {ADMIN}"}):
        yield srv


def test_tokens_and_scopes(secured: Server, repository: Path) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    with contextlib.closing(tg.InferenceServerClient(url=secured.grpc_url)) as c:
        assert c.is_server_live() and c.is_server_ready()  # health needs no token
        for headers, message in (
            (None, "missing bearer token"),
            ({"authorization": "Bearer wrong-token-0123456789"}, "invalid bearer token"),
        ):
            with pytest.raises(InferenceServerException, match=message or None) as exc:
                c.infer("linear", [_input("x", x)], headers=headers)
            assert _code(exc) == "StatusCode.UNAUTHENTICATED"
        for token in (INFER, ADMIN):
            got = c.infer("linear", [_input("x", x)], headers={"authorization": f"Bearer {token}"})
            np.testing.assert_allclose(got.as_numpy("scores"), expected["scores"], rtol=1e-6)
        with pytest.raises(InferenceServerException, match="admin scope") as exc:
            c.unload_model("linear", headers={"authorization": f"Bearer {INFER}"})
        assert _code(exc) == "StatusCode.PERMISSION_DENIED"
        assert c.is_model_ready("linear", headers={"authorization": f"Bearer {INFER}"})
        # Client shared memory is off on this server (the default): UNIMPLEMENTED, naming the setting.
        with pytest.raises(InferenceServerException, match="MODEL_SERVER_ALLOW_CLIENT_SHM") as exc:
            c.get_system_shared_memory_status(headers={"authorization": f"Bearer {INFER}"})
        assert _code(exc) == "StatusCode.UNIMPLEMENTED"
        c.unload_model("linear", headers={"authorization": f"Bearer {ADMIN}"})
        assert not c.is_model_ready("linear", headers={"authorization": f"Bearer {ADMIN}"})


# --- drain --------------------------------------------------------------------------------------------


class DrainLoad:
    """Clients that keep inferring on the slow model, and a health prober, until told to stop."""

    def __init__(self, url: str, x: np.ndarray, expected: np.ndarray) -> None:
        self.url, self.x, self.expected = url, x, expected
        self.outcomes: list[tuple[str, float, float]] = []  # (outcome, sent at, answered at)
        self.health: list[int] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _one(self, c: tg.InferenceServerClient) -> str:
        try:
            result = c.infer("slow", [_input("x", self.x)], client_timeout=60)
        except InferenceServerException as exc:
            return "draining" if "server is draining" in str(exc.message()) else f"gone:{exc.status()}"
        return "ok" if np.allclose(result.as_numpy("y"), self.expected, rtol=1e-5) else "wrong"

    def send(self) -> None:
        with contextlib.closing(tg.InferenceServerClient(url=self.url)) as c:
            for _ in range(300):
                if self.stop.is_set():
                    return
                sent = time.monotonic()
                outcome = self._one(c)
                with self.lock:
                    self.outcomes.append((outcome, sent, time.monotonic()))
                if outcome.startswith("gone"):
                    return

    def probe(self) -> None:
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(2000):
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError:
                    return
                self.health.append(reply.status)
                time.sleep(0.02)


def test_sigterm_drains_grpc_like_http(repository: Path) -> None:
    """RPCs running when SIGTERM comes are answered with their results, new ones get UNAVAILABLE
    "server is draining", the health service turns NOT_SERVING, and the process exits 0."""
    server = Server(repository, workers=2, MODEL_SERVER_DRAIN_SECONDS=20, MODEL_SERVER_FRONTEND_PROCESSES=1)
    try:
        server.start()
        loaded = server.client.post("/v1/models/load", json={"model_id": "slow", "version": "1"})
        assert loaded.status_code == 200, loaded.text
        x = np.ones((64, 1024), dtype=np.float32) / 3  # a second or so each: the drain has RPCs to wait for
        load = DrainLoad(server.grpc_url, x, ort_run(repository / "slow" / "1" / "model.onnx", {"x": x})["y"])
        threads = [threading.Thread(target=load.send) for _ in range(3)] + [
            threading.Thread(target=load.probe)
        ]
        for t in threads:
            t.start()
        server.wait_for(lambda: len(load.outcomes) >= 6, 60, "RPCs to flow")
        assert server.proc is not None
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        load.stop.set()
        for t in threads:
            t.join(60)
        outcomes = load.outcomes
        timeline = [
            (o, round(sent - sigterm_at, 3), round(done - sigterm_at, 3)) for o, sent, done in outcomes
        ]
        # Sent before SIGTERM: answered, with the result or (arriving once the drain began) 503.
        before = {o for o, sent, _ in outcomes if sent < sigterm_at}
        assert before and before <= {"ok", "draining"}, timeline
        # Sent after: the same, or never taken (the listener had stopped; a call in the
        # transport when it stopped is cancelled by gRPC before any handler saw it).
        after = {o for o, sent, _ in outcomes if sent >= sigterm_at}
        assert after <= {"ok", "draining", "gone:StatusCode.UNAVAILABLE", "gone:StatusCode.CANCELLED"}, (
            timeline
        )
        finished_after = [o for o, sent, done in outcomes if sent < sigterm_at < done]
        assert "ok" in finished_after, timeline  # running when SIGTERM came: answered with its result
        assert load.health[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in load.health
        assert server.proc.returncode == 0
    finally:
        server.stop()
