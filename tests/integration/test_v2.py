"""Open Inference Protocol (V2), judged by tritonclient against the real stack, and raw-HTTP abuse."""

from __future__ import annotations

import contextlib
import gzip
import secrets
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import models
from tests.models import ort_run

from .readme_examples import README, fraud_expected, printed_numbers
from .regions import client_region
from .server import Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def v2server(repository: Path) -> Iterator[Server]:
    srv = Server(repository, workers=2, MODEL_SERVER_ALLOW_CLIENT_SHM="true")
    try:
        srv.start()
        for model, version in (("linear", "1"), ("multi", "1"), ("types", "1")):
            r = srv.client.post("/v1/models/load", json={"model_id": model, "version": version})
            assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(v2server: Server) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(url=f"127.0.0.1:{v2server.port}")
    try:
        yield c
    finally:
        c.close()


def _input(name: str, array: np.ndarray, binary: bool = True) -> tc.InferInput:
    inp = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def test_health_and_metadata(client: tc.InferenceServerClient, v2server: Server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "model-server"
    assert set(meta["extensions"]) == {
        "binary_tensor_data",
        "classification",
        "model_repository",
        "statistics",
        "system_shared_memory",
    }
    model = client.get_model_metadata("linear", "1")
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert {o["name"] for o in model["outputs"]} == {"scores", "label"}
    assert client.is_model_ready("linear", "1")
    assert not client.is_model_ready("linear", "9")
    config = client.get_model_config("linear")
    assert config["platform"] == "onnxruntime_onnx" and config["input"][0]["data_type"] == "TYPE_FP32"


def test_repository_index_load_unload(client: tc.InferenceServerClient, repository: Path) -> None:
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert index[("linear", "1")]["state"] == "READY"
    assert index[("credit", "1")]["state"] == "UNAVAILABLE"
    client.load_model("credit")
    assert client.is_model_ready("credit", "1")
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    name = "X" if "X" in _inputs(client, "credit") else _inputs(client, "credit")[0]
    result = client.infer("credit", [_input(name, x)])
    expected = ort_run(repository / "credit" / "1" / "model.onnx", {name: x})
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    client.unload_model("credit")
    assert not client.is_model_ready("credit")
    with pytest.raises(InferenceServerException, match="credit"):
        client.unload_model("credit")


def _inputs(client: tc.InferenceServerClient, model: str) -> list[str]:
    return [i["name"] for i in client.get_model_metadata(model)["inputs"]]


def test_infer_json_binary_and_request_id(client: tc.InferenceServerClient, repository: Path) -> None:
    x = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    # JSON in, JSON out (outputs named, binary_data=False).
    outs = [
        tc.InferRequestedOutput("scores", binary_data=False),
        tc.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer(
        "linear", [_input("x", x, binary=False)], model_version="1", outputs=outs, request_id="r-42"
    )
    assert result.get_response()["id"] == "r-42"
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    # tritonclient's default path: binary inputs, no outputs named -> binary outputs.
    result = client.infer("linear", [_input("x", x)], model_version="1")
    response = result.get_response()
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    # Compressed request body.
    result = client.infer("linear", [_input("x", x)], model_version="1", request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    client: tc.InferenceServerClient, repository: Path, v2server: Server, algorithm: str
) -> None:
    """tritonclient's request_/response_compression_algorithm, and plain HTTP content negotiation."""
    x = np.random.default_rng(8).normal(size=(300, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    for binary in (True, False):
        outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "label")]
        result = client.infer(
            "linear",
            [_input("x", x, binary=binary)],
            outputs=outs,
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [300, 3], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    )
    # httpx asks for gzip and deflate by default: say identity to get the body as it is.
    plain = _post(v2server, body, {"content-type": "application/json", "accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    packed = _post(v2server, body, {"content-type": "application/json", "accept-encoding": algorithm})
    assert packed.headers["content-encoding"] == algorithm
    assert int(packed.headers["content-length"]) < len(plain.content) / 2
    assert packed.json() == plain.json()  # httpx inflates it
    # A client that refuses both (q=0) gets the body as it is.
    refused = _post(v2server, body, {"accept-encoding": f"{algorithm};q=0, br"})
    assert "content-encoding" not in refused.headers and refused.json() == plain.json()
    # The seed's /v1 path negotiates the same way (curl --compressed).
    records = [{"f0": float(a), "f1": float(b), "f2": float(c)} for a, b, c in x[:100]]
    v1 = v2server.client.post(
        "/v1/infer",
        json={"model_id": "linear", "model_version": "1", "inputs": records},
        headers={"accept-encoding": f"br, {algorithm}"},
    )
    assert v1.status_code == 200 and v1.headers["content-encoding"] == algorithm
    # ...and takes a compressed request body.
    payload = orjson.dumps({"model_id": "linear", "model_version": "1", "inputs": records})
    packed_body = gzip.compress(payload) if algorithm == "gzip" else zlib.compress(payload)
    again = v2server.client.post(
        "/v1/infer",
        content=packed_body,
        headers={"content-type": "application/json", "content-encoding": algorithm},
    )
    assert again.status_code == 200, again.text
    assert again.json()["outputs"] == v1.json()["outputs"]
    np.testing.assert_allclose(
        [o["scores"] for o in v1.json()["outputs"]], expected["scores"][:100], rtol=1e-6
    )


def _text(cell: object) -> str:
    # tritonclient gives BYTES as bytes from binary outputs and as str from JSON ones.
    return cell.decode() if isinstance(cell, bytes) else str(cell)


def test_classification_extension(client: tc.InferenceServerClient, repository: Path) -> None:
    """tritonclient's class_count: the top classes of each row as "value:index" strings."""
    x = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    scores = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})["scores"]
    for binary in (True, False):
        top = tc.InferRequestedOutput("scores", binary_data=binary, class_count=1)
        result = client.infer("linear", [_input("x", x)], outputs=[top])
        got = result.as_numpy("scores")
        assert got.shape == (5, 1)
        for row, (cell,) in zip(scores, got, strict=True):
            value, index = _text(cell).split(":")
            assert int(index) == int(np.argmax(row))
            assert float(value) == pytest.approx(float(row.max()), abs=1e-6)
    # More classes than the output has: all of them, best first.
    every = tc.InferRequestedOutput("scores", class_count=9)
    ranked = client.infer("linear", [_input("x", x)], outputs=[every]).as_numpy("scores")
    assert ranked.shape == (5, 2)
    assert [[int(_text(c).split(":")[1]) for c in row] for row in ranked] == np.argsort(
        -scores, axis=1
    ).tolist()
    with pytest.raises(InferenceServerException, match="needs a numeric output") as exc:
        client.infer(
            "multi",
            [
                _input("count", np.array([[1]], dtype=np.int64)),
                _input("amount", np.array([[1.0]], dtype=np.float32)),
                _input("flag", np.array([[True]])),
                _input("tag", np.array([[b"a"]], dtype=object)),
            ],
            outputs=[tc.InferRequestedOutput("tag_out", class_count=1)],
        )
    assert exc.value.status() == "400"


def test_datatypes_and_shapes(client: tc.InferenceServerClient, repository: Path) -> None:
    arrays = models.datatype_arrays()
    feeds = {f"in_{k}": v for k, v in arrays.items()}
    expected = ort_run(repository / "types" / "1" / "model.onnx", feeds)
    for binary in (True, False):
        inputs = [_input(name, value, binary=binary) for name, value in feeds.items()]
        outputs = [tc.InferRequestedOutput(f"out_{k}", binary_data=binary) for k in arrays]
        result = client.infer("types", inputs, outputs=outputs)
        for k in arrays:
            got = result.as_numpy(f"out_{k}")
            assert got.dtype == expected[f"out_{k}"].dtype, k
            np.testing.assert_array_equal(got, expected[f"out_{k}"], err_msg=f"{k} binary={binary}")


def test_bytes_and_bool(client: tc.InferenceServerClient, repository: Path) -> None:
    feeds: dict[str, np.ndarray] = {
        "count": np.array([[2], [5], [-1]], dtype=np.int64),
        "amount": np.array([[1.5], [0.5], [4.0]], dtype=np.float32),
        "flag": np.array([[True], [False], [True]]),
        "tag": np.array([["a"], [""], ["ünï"]], dtype=object),
    }
    expected = ort_run(repository / "multi" / "1" / "model.onnx", feeds)
    for binary in (True, False):
        inputs = [
            _input("count", feeds["count"], binary),
            _input("amount", feeds["amount"], binary),
            _input("flag", feeds["flag"], binary),
            _input("tag", np.array([[s.encode()] for s in feeds["tag"][:, 0]], dtype=object), binary),
        ]
        outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("total", "not_flag", "tag_out")]
        result = client.infer("multi", inputs, outputs=outs)
        np.testing.assert_allclose(result.as_numpy("total"), expected["total"])
        np.testing.assert_array_equal(result.as_numpy("not_flag"), expected["not_flag"])
        tags = [t.decode() if isinstance(t, bytes) else t for t in result.as_numpy("tag_out").reshape(-1)]
        assert tags == list(expected["tag_out"].reshape(-1))


def _region(client: tc.InferenceServerClient, name: str, size: int) -> contextlib.AbstractContextManager[Any]:
    return client_region(client, name, size, "test")


def test_shared_memory_inputs_and_outputs(
    client: tc.InferenceServerClient, repository: Path, v2server: Server
) -> None:
    x = np.random.default_rng(9).normal(size=(6, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    scores_size = expected["scores"].nbytes
    with (
        _region(client, "in0", x.nbytes) as in_handle,
        _region(client, "out0", scores_size + 64) as out_handle,
    ):
        shm.set_shared_memory_region(in_handle, [x])
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status["in0"]["byte_size"] == x.nbytes
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory("in0", x.nbytes)
        out = tc.InferRequestedOutput("scores", binary_data=True)
        out.set_shared_memory("out0", scores_size)
        label = tc.InferRequestedOutput("label", binary_data=True)
        result = client.infer("linear", [inp], outputs=[out, label])
        meta = result.get_output("scores")
        assert meta["parameters"]["shared_memory_region"] == "out0"
        assert "data" not in meta
        got = shm.get_contents_as_numpy(out_handle, np.float32, [6, 2])
        np.testing.assert_allclose(got, expected["scores"], rtol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        too_small = tc.InferRequestedOutput("scores", binary_data=True)
        too_small.set_shared_memory("out0", 8)
        with pytest.raises(InferenceServerException, match="needs 48 bytes"):
            client.infer("linear", [inp], outputs=[too_small])
    with pytest.raises(InferenceServerException, match="not registered"):
        client.infer("linear", [inp])


def _fresh(url: str) -> contextlib.closing[tc.InferenceServerClient]:
    """A client on a new connection: SO_REUSEPORT may hand it to any frontend."""
    return contextlib.closing(tc.InferenceServerClient(url=url))


@contextlib.contextmanager
def _region_via_fresh_connection(url: str, name: str, x: np.ndarray) -> Iterator[tc.InferInput]:
    """A client region holding ``x``, registered over a new connection, and the input naming it;
    the segment is destroyed on exit (unregistering it is the caller's part)."""
    key = f"/ms_test_{name}_{secrets.token_hex(3)}"
    handle = shm.create_shared_memory_region(name, key, x.nbytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        with _fresh(url) as registrar:
            registrar.register_system_shared_memory(name, key, x.nbytes)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory(name, x.nbytes)
        yield inp
    finally:
        shm.destroy_shared_memory_region(handle)


def test_region_registered_through_one_frontend_is_usable_at_once_through_any(
    repository: Path, v2server: Server
) -> None:
    """Each call opens its own connection, so SO_REUSEPORT spreads them over the frontends;
    a region registered through one must serve the very next request through another."""
    assert len([r for r in v2server.processes() if r.startswith("frontend")]) >= 2
    url = f"127.0.0.1:{v2server.port}"
    x = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    for attempt in range(12):
        name = f"hop{attempt}"
        with _region_via_fresh_connection(url, name, x) as inp:
            try:
                with _fresh(url) as user:
                    result = user.infer("linear", [inp])
                np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
            finally:
                with _fresh(url) as cleaner:
                    cleaner.unregister_system_shared_memory(name)


def test_region_unregistered_through_one_frontend_is_refused_at_once_through_any(
    repository: Path, v2server: Server
) -> None:
    """The other direction: once unregister has answered, no frontend may still use the region
    (the client may reuse that memory). Fresh connections spread over the frontends."""
    url = f"127.0.0.1:{v2server.port}"
    x = np.random.default_rng(5).normal(size=(2, 3)).astype(np.float32)
    for attempt in range(12):
        name = f"gone{attempt}"
        with _region_via_fresh_connection(url, name, x) as inp:
            with _fresh(url) as warm:
                warm.infer("linear", [inp])  # every frontend that serves this has it in its table
            with _fresh(url) as cleaner:
                cleaner.unregister_system_shared_memory(name)
            with _fresh(url) as user, pytest.raises(InferenceServerException, match="not registered"):
                user.infer("linear", [inp])


def test_statistics_extension_counts_every_frontend_and_worker(
    client: tc.InferenceServerClient, repository: Path, v2server: Server
) -> None:
    """tritonclient's get_inference_statistics: the server-wide sums, per model version."""
    started_ms = time.time() * 1000
    before = client.get_inference_statistics("linear", "1")["model_stats"][0]
    x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    for _ in range(5):
        # A fresh connection each time, so both frontend processes take some.
        with contextlib.closing(tc.InferenceServerClient(url=f"127.0.0.1:{v2server.port}")) as other:
            result = other.infer("linear", [_input("x", x)])
        np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    with pytest.raises(InferenceServerException):
        client.infer("linear", [_input("x", np.ones((2, 4), dtype=np.float32))])
    after = client.get_inference_statistics("linear", "1")["model_stats"][0]
    assert (after["name"], after["version"]) == ("linear", "1")

    def delta(phase: str, field: str) -> int:
        return int(after["inference_stats"][phase][field]) - int(before["inference_stats"][phase][field])

    assert delta("success", "count") == 5 and delta("success", "ns") > 0
    assert delta("fail", "count") == 1
    assert delta("queue", "count") == 5 and delta("compute_infer", "count") == 5
    assert delta("compute_infer", "ns") > 0
    assert int(after["inference_count"]) - int(before["inference_count"]) == 5 * 4
    assert int(after["execution_count"]) - int(before["execution_count"]) == 5
    assert int(after["last_inference"]) >= started_ms
    # Every loaded model, and the same entry through the unversioned path.
    everything = {(m["name"], m["version"]) for m in client.get_inference_statistics()["model_stats"]}
    assert {("linear", "1"), ("multi", "1"), ("types", "1")} <= everything
    unversioned = client.get_inference_statistics("linear")["model_stats"]
    assert [m["version"] for m in unversioned] == ["1"]
    assert unversioned[0]["inference_count"] == after["inference_count"]
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_inference_statistics("no_such_model")


def test_errors_raise_with_the_servers_message(client: tc.InferenceServerClient) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(InferenceServerException, match="not loaded") as exc:
        client.infer("no_such_model", [_input("x", x)])
    assert exc.value.status() == "404"
    with pytest.raises(InferenceServerException, match="datatype FP64 does not match") as exc:
        client.infer("linear", [_input("x", x.astype(np.float64))])
    assert exc.value.status() == "400"
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("linear", [_input("x", np.ones((2, 4), dtype=np.float32))])
    with pytest.raises(InferenceServerException, match="unexpected inference output 'nope'"):
        client.infer("linear", [_input("x", x)], outputs=[tc.InferRequestedOutput("nope")])
    with pytest.raises(InferenceServerException, match="does not exist"):
        client.register_system_shared_memory("ghost", "/ms_no_such_region", 64)


def _post(server: Server, body: bytes, headers: dict[str, str], model: str = "linear") -> httpx.Response:
    return server.client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def test_malformed_requests_get_400_and_the_server_keeps_serving(v2server: Server) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
            ]
        }
    )
    good = header + x.tobytes()
    r = _post(v2server, good, {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text

    cases = {
        "length past the body": (
            good,
            {"Inference-Header-Content-Length": str(len(good) + 10)},
            "outside the body",
        ),
        "length inside the JSON": (
            good,
            {"Inference-Header-Content-Length": str(len(header) - 5)},
            "not valid JSON",
        ),
        "length not a number": (good, {"Inference-Header-Content-Length": "abc"}, "not a number"),
        "binary short": (
            header + x.tobytes()[:20],
            {"Inference-Header-Content-Length": str(len(header))},
            "runs past",
        ),
        "binary extra": (
            header + x.tobytes() + b"\0" * 8,
            {"Inference-Header-Content-Length": str(len(header))},
            "belong to no input",
        ),
    }
    for label, (body, headers, message) in cases.items():
        r = _post(v2server, body, headers)
        assert r.status_code == 400, (label, r.text)
        assert message in r.json()["error"], (label, r.json())

    def json_case(inputs: list[dict[str, object]], message: str, status: int = 400) -> None:
        r = _post(v2server, orjson.dumps({"inputs": inputs}), {"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"], r.json()

    json_case(
        [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}], "do not fill shape"
    )
    json_case([{"name": "x", "shape": [2, 3], "datatype": "FLOAT", "data": [1] * 6}], "unknown datatype")
    json_case([{"name": "x", "shape": [2, 3], "datatype": "BF16", "data": [1] * 6}], "not supported", 501)
    json_case([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": ["a"] * 6}], "must be numbers")
    json_case(
        [{"name": "y", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6}], "unexpected inference input"
    )
    json_case(
        [
            {
                "name": "x",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "nowhere", "shared_memory_byte_size": 24},
            }
        ],
        "not registered",
    )
    r = _post(v2server, b"{", {"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]

    # A region that exists but is smaller than the request says.
    key = f"/ms_small_{secrets.token_hex(3)}"
    handle = shm.create_shared_memory_region("small", key, 16)
    try:
        reg = v2server.client.post(
            "/v2/systemsharedmemory/region/small/register", json={"key": key, "byte_size": 16}
        )
        assert reg.status_code == 200, reg.text
        json_case(
            [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"shared_memory_region": "small", "shared_memory_byte_size": 24},
                }
            ],
            "exceeds shared memory region 'small'",
        )
        bad = v2server.client.post(
            "/v2/systemsharedmemory/region/big/register", json={"key": key, "byte_size": 4096}
        )
        assert bad.status_code == 400 and "exceeds" in bad.json()["error"]
        traversal = v2server.client.post(
            "/v2/systemsharedmemory/region/evil/register", json={"key": "/../etc/passwd", "byte_size": 4}
        )
        assert traversal.status_code == 400
    finally:
        v2server.client.post("/v2/systemsharedmemory/region/small/unregister")
        shm.destroy_shared_memory_region(handle)
    r = _post(v2server, good, {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200

    # Every body slot of the refused requests went back to the arena (the gauge is sampled each second).
    def arena_empty() -> bool:
        text = v2server.client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("model_server_shm_bytes_in_use"))
        return float(line.split()[-1]) == 0

    v2server.wait_for(arena_empty, 10, "the arena to be empty")
    # Binary inputs, no binary outputs asked for: a plain JSON answer.
    assert "Inference-Header-Content-Length" not in r.headers
    expected = ort_run(v2server.repository / "linear" / "1" / "model.onnx", {"x": x})
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(
        np.array(outputs["scores"]["data"]).reshape(2, 2), expected["scores"], rtol=1e-6
    )


def test_shm_is_off_by_default(server: Server) -> None:
    r = server.client.post("/v2/systemsharedmemory/region/a/register", json={"key": "/x", "byte_size": 8})
    assert r.status_code == 501 and "MODEL_SERVER_ALLOW_CLIENT_SHM" in r.json()["error"]
    meta = server.client.get("/v2").json()
    assert "system_shared_memory" not in meta["extensions"]


def test_readme_tritonclient_examples_run(v2server: Server, repository: Path) -> None:
    """The README's Python examples (JSON, binary, shared memory) run as written and print ORT's answer."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    loaded = v2server.client.post("/v1/models/load", json={"model_id": "fraud_detection", "version": "2.0.0"})
    assert loaded.status_code == 200, loaded.text
    code = "\n".join(blocks).replace("localhost:8001", f"127.0.0.1:{v2server.port}")
    code = code.replace('"/fraud_in"', f'"/fraud_in_{secrets.token_hex(3)}"').replace(
        '"/fraud_out"', f'"/fraud_out_{secrets.token_hex(3)}"'
    )
    values, printed = printed_numbers(code)
    assert len(values) == 3 * 2, printed
    for i in range(3):
        np.testing.assert_allclose(values[2 * i : 2 * i + 2], fraud_expected(repository), rtol=1e-5)
