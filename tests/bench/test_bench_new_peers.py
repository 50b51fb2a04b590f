"""The new peers for real: PyTriton (its gRPC endpoint drives the gRPC load generator) and
LitServe, each started from its own venv on 127.0.0.1 and always stopped; answers are
compared with an in-test onnxruntime run. Skipped where a venv is not built
(``python -m bench.run --peers pytriton,litserve`` builds them; it needs PyPI)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.h2load import h2load_path, h2load_version
from bench.models import REFERENCE_MODELS, build_models, sample_input
from bench.more_peers import LitServePeer, PyTritonPeer
from bench.ort_options import session_options
from bench.payloads import v2_json_body
from bench.peers import HOST, Peer, PeerOptions, http_request
from bench.runner import RunSettings, grpc_unreachable, run_cell
from bench.stats import SKIPPED, Cell
from bench.venv import LITSERVE, PYTRITON, is_current, venv_bin
from tests.bench.conftest import running

pytestmark = pytest.mark.integration

SPEC = REFERENCE_MODELS["tabular"]


def needs_venv(name: str, current: bool) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not current, reason=f"{name} not built (python -m bench.run --peers {name})")


pytriton_venv = needs_venv("pytriton", is_current(PYTRITON.venv, PYTRITON.requirements, PYTRITON.marker))
litserve_venv = needs_venv("litserve", is_current(LITSERVE.venv, LITSERVE.requirements, LITSERVE.marker))


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"), ["tabular"])["tabular"]


def expected(model: Path, rows: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])
    return list(session.run([o.name for o in session.get_outputs()], {SPEC.input.name: rows}))


@pytest.fixture
def pytriton(tmp_path: Path, tabular: Path) -> Iterator[PyTritonPeer]:
    python = venv_bin("python", PYTRITON.venv)
    yield from running(PyTritonPeer(tmp_path, PeerOptions(workers=2), {"tabular": tabular}, python))


@pytriton_venv
def test_grpc_generators_against_pytriton(pytriton: PyTritonPeer, tabular: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    rows = sample_input(SPEC, 1)
    client = grpcclient.InferenceServerClient(f"{HOST}:{pytriton.grpc_port}")
    try:
        infer_input = grpcclient.InferInput(SPEC.input.name, list(rows.shape), SPEC.input.datatype)
        infer_input.set_data_from_numpy(rows)  # raw_input_contents, tritonclient's default
        result = client.infer("tabular", [infer_input])
    finally:
        client.close()
    label, probabilities = expected(tabular, rows)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)

    settings = RunSettings(
        duration_s=1.0, reps=1, warmup_s=0.5, py_client_max=2, timeout_s=20.0, results_dir=tmp_path
    )
    clients = {"py-grpc": "Python tritonclient.grpc, 2 process(es) x 2 thread(s)"}
    if h2load_path() is not None:
        clients["grpc"] = f"h2load {h2load_version()}, 2 thread(s)"  # checked against Triton's counters
    for path, client in clients.items():
        cell = Cell("pytriton", "tabular", path, 4, served_as="tabular")
        run_cell(pytriton, cell, settings, {"tabular": tabular})
        assert cell.ok, cell.error
        assert cell.client == client
        assert cell.reps[0].requests > 0 and cell.errors == 0
        assert cell.mean_batch_rows == pytest.approx(1.0)  # from Triton's metrics: no batcher on this model


def test_grpc_cell_is_skipped_without_a_listener_or_h2load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = Peer(tmp_path, PeerOptions())
    assert grpc_unreachable(peer) == "peer has no gRPC endpoint"
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind((HOST, 0))
        peer.grpc_port = sock.getsockname()[1]
    reason = grpc_unreachable(peer, wait_s=0.2)
    assert reason is not None and "MODEL_SERVER_GRPC_PORT" in reason
    cell = Cell("ours", "tabular", "grpc", 32, served_as="tabular")
    run_cell(peer, cell, RunSettings(duration_s=1.0, reps=1), {})
    assert cell.skipped and not cell.reps and cell.error is not None and "no gRPC frontend" in cell.error
    monkeypatch.setenv("PATH", str(tmp_path))  # no h2load on it
    with socket.create_server((HOST, 0)) as listener:
        peer.grpc_port = listener.getsockname()[1]
        cell = Cell("ours", "tabular", "grpc", 32, served_as="tabular")
        run_cell(peer, cell, RunSettings(duration_s=1.0, reps=1), {})
    assert (
        cell.skipped
        and cell.error == SKIPPED + "h2load is not installed (sudo apt-get install -y nghttp2-client)"
    )


@litserve_venv
def test_litserve_answers_the_wrk_body(tmp_path: Path, tabular: Path) -> None:
    peer = LitServePeer(
        tmp_path, PeerOptions(workers=2), {"tabular": tabular}, venv_bin("python", LITSERVE.venv)
    )
    peer.start()
    try:
        rows = sample_input(SPEC, 2)
        status, _, body = http_request(
            peer.port,
            "POST",
            "/v2/models/tabular/infer",
            v2_json_body(SPEC, rows),
            {"Content-Type": "application/json"},
        )
        assert status == 200, body[:300]
        outputs = {out["name"]: out for out in json.loads(body)["outputs"]}
        label, probabilities = expected(tabular, rows)
        np.testing.assert_array_equal(np.asarray(outputs["label"]["data"]).reshape(label.shape), label)
        np.testing.assert_allclose(
            np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(probabilities.shape),
            probabilities,
            rtol=1e-6,
        )
        status, _, body = http_request(
            peer.port,
            "POST",
            "/v2/models/tabular/infer",
            b'{"inputs": []}',
            {"Content-Type": "application/json"},
        )
        assert status >= 400  # a bad body is an error answer, not a crash
        assert http_request(peer.port, "GET", "/health")[0] == 200
    finally:
        peer.stop()
    assert peer.proc is None
