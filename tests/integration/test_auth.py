"""Access control and log forging against the real stack.

One server with admin and inference tokens from the environment (and client shared
memory on, and ``/metrics`` behind a token); one with the tokens from files, as a
Kubernetes Secret mounts them; one with no tokens on loopback (``make serve``'s default).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from frontend.auth import AuthScope
from tests.frontend.test_auth import ROUTE_SCOPES
from tests.models import ort_run

from .readme_examples import README, fraud_expected, printed_numbers
from .server import Server

pytestmark = pytest.mark.integration

ADMIN = "adm-" + secrets.token_hex(16)
ADMIN_2 = "adm2-" + secrets.token_hex(16)
INFER = "inf-" + secrets.token_hex(16)
TOKENS = {"none": None, "inference": INFER, "admin": ADMIN}

# One concrete request per route of ROUTE_SCOPES, and what it answers once access is granted
# (its normal status: a success, or the route's own refusal of this harmless input; a tuple
# where the route's own answer to a model or region that does not exist may reasonably vary).
REQUESTS: dict[tuple[str, str], tuple[str, dict[str, Any] | None, int | tuple[int, ...]]] = {
    ("GET", "/openapi.json"): ("/openapi.json", None, 200),
    ("GET", "/docs"): ("/docs", None, 200),
    ("GET", "/docs/oauth2-redirect"): ("/docs/oauth2-redirect", None, 200),
    ("GET", "/redoc"): ("/redoc", None, 200),
    ("GET", "/health"): ("/health", None, 200),
    ("GET", "/ready"): ("/ready", None, 200),
    ("GET", "/metrics"): ("/metrics", None, 200),
    ("POST", "/v1/models/load"): ("/v1/models/load", {}, 422),
    ("GET", "/v1/models"): ("/v1/models", None, 200),
    ("GET", "/v1/models/{model_id}/{version}"): ("/v1/models/fraud_detection/2.0.0", None, 200),
    ("DELETE", "/v1/models/{model_id}/{version}"): ("/v1/models/nope/1", None, 404),
    ("POST", "/v1/infer"): ("/v1/infer", {"model_id": "nope", "version": "1", "records": [{}]}, 404),
    ("GET", "/v2/health/live"): ("/v2/health/live", None, 200),
    ("GET", "/v2/health/ready"): ("/v2/health/ready", None, 200),
    ("GET", "/v2"): ("/v2", None, 200),
    ("GET", "/v2/models/stats"): ("/v2/models/stats", None, 200),
    ("GET", "/v2/models/{model}/stats"): ("/v2/models/fraud_detection/stats", None, 200),
    ("GET", "/v2/models/{model}/versions/{version}/stats"): (
        "/v2/models/fraud_detection/versions/2.0.0/stats",
        None,
        200,
    ),
    ("GET", "/v2/models/{model}"): ("/v2/models/fraud_detection", None, 200),
    ("GET", "/v2/models/{model}/versions/{version}"): (
        "/v2/models/fraud_detection/versions/2.0.0",
        None,
        200,
    ),
    ("GET", "/v2/models/{model}/ready"): ("/v2/models/fraud_detection/ready", None, 200),
    ("GET", "/v2/models/{model}/versions/{version}/ready"): (
        "/v2/models/fraud_detection/versions/2.0.0/ready",
        None,
        200,
    ),
    ("GET", "/v2/models/{model}/config"): ("/v2/models/fraud_detection/config", None, 200),
    ("GET", "/v2/models/{model}/versions/{version}/config"): (
        "/v2/models/fraud_detection/versions/2.0.0/config",
        None,
        200,
    ),
    ("POST", "/v2/models/{model}/infer"): ("/v2/models/nope/infer", {"inputs": []}, 404),
    ("POST", "/v2/models/{model}/versions/{version}/infer"): (
        "/v2/models/nope/versions/1/infer",
        {"inputs": []},
        404,
    ),
    ("POST", "/v2/repository/index"): ("/v2/repository/index", {}, 200),
    ("POST", "/v2/repository/models/{model}/load"): ("/v2/repository/models/nope/load", {}, (400, 403, 404)),
    ("POST", "/v2/repository/models/{model}/unload"): ("/v2/repository/models/nope/unload", {}, (200, 404)),
    ("POST", "/v2/systemsharedmemory/region/{name}/register"): (
        "/v2/systemsharedmemory/region/r/register",
        {"key": "/ms_auth_no_such_region", "byte_size": 8},
        (400, 404),
    ),
    ("POST", "/v2/systemsharedmemory/region/{name}/unregister"): (
        "/v2/systemsharedmemory/region/r/unregister",
        None,
        200,
    ),
    ("POST", "/v2/systemsharedmemory/unregister"): ("/v2/systemsharedmemory/unregister", None, 200),
    ("GET", "/v2/systemsharedmemory/status"): ("/v2/systemsharedmemory/status", None, 200),
    ("GET", "/v2/systemsharedmemory/region/{name}/status"): (
        "/v2/systemsharedmemory/region/r/status",
        None,
        400,
    ),
}


@pytest.fixture(scope="module")
def secured(repository: Path) -> Iterator[Server]:
    models_file = repository.parent / "auth-startup-models.yaml"
    models_file.write_text('models:\n  - model_id: fraud_detection\n    version: "2.0.0"\n')
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_MODELS_FILE=models_file,
        MODEL_SERVER_ADMIN_TOKENS=f"{ADMIN},{ADMIN_2}",
        MODEL_SERVER_INFERENCE_TOKENS=INFER,
        MODEL_SERVER_ALLOW_CLIENT_SHM="true",
        MODEL_SERVER_METRICS_REQUIRE_AUTH="true",
    )
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


# The messages of frontend/auth.py's refusals: a route's own 403 must not be one of them.
AUTH_REFUSAL = re.compile(r"bearer token|admin scope|admin endpoints are off")


def headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_requests_cover_every_route() -> None:
    assert REQUESTS.keys() == ROUTE_SCOPES.keys()


@pytest.mark.parametrize("who", sorted(TOKENS))
def test_every_route_with_each_token(secured: Server, who: str) -> None:
    token = TOKENS[who]
    for (method, template), (path, body, normal) in REQUESTS.items():
        needed = ROUTE_SCOPES[(method, template)]
        if template == "/metrics":
            needed = AuthScope.INFERENCE  # MODEL_SERVER_METRICS_REQUIRE_AUTH=true on this server
        response = secured.client.request(method, path, json=body, headers=headers(token))
        where = f"{method} {path} as {who}: {response.status_code} {response.text[:300]}"
        if needed is AuthScope.OPEN or (needed is AuthScope.INFERENCE and token) or token == ADMIN:
            # Let in: the route answers as it always does.
            assert response.status_code in (normal if isinstance(normal, tuple) else (normal,)), where
            assert "www-authenticate" not in response.headers, where
            if response.status_code >= 400:
                assert not AUTH_REFUSAL.search(response.text), where
            continue
        if token is None:
            assert response.status_code == 401, where
            assert response.headers["www-authenticate"] == 'Bearer realm="model-server"', where
        else:
            assert (needed, response.status_code) == (AuthScope.ADMIN, 403), where
        error = response.json()["error"]
        if path.startswith("/v2"):
            assert isinstance(error, str) and AUTH_REFUSAL.search(error), where
        else:
            assert error["code"] in ("unauthorized", "forbidden"), where
            assert error["request_id"] == response.headers["x-request-id"], where


def test_unknown_paths_and_bad_tokens_get_401(secured: Server) -> None:
    # Without a token a path nobody serves answers like any other: no oracle for what exists.
    assert secured.client.get("/v1/nothing-here").status_code == 401
    assert secured.client.get("/v1/nothing-here", headers=headers(INFER)).status_code == 404
    bad = secured.client.get("/v2/models/fraud_detection", headers=headers(INFER + "x"))
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == 'Bearer realm="model-server", error="invalid_token"'
    assert bad.json() == {"error": "invalid bearer token"}
    # Every admin token of the comma list works.
    listed = secured.client.get("/v1/models", headers=headers(ADMIN_2))
    assert listed.status_code == 200
    assert "fraud_detection" in {m["model_id"] for m in listed.json()["models"]}  # start-up model loaded


def _fraud_inputs() -> tuple[list[tc.InferInput], dict[str, np.ndarray]]:
    feeds = {
        "feature1": np.array([[1.0], [3.0], [0.5]], np.float32),
        "feature2": np.array([[2.0], [4.0], [-1.0]], np.float32),
    }
    inputs = []
    for name, array in feeds.items():
        inp = tc.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs, feeds


def test_tritonclient_with_an_authorization_header(secured: Server, repository: Path) -> None:
    admin, infer = headers(ADMIN), headers(INFER)
    with contextlib.closing(tc.InferenceServerClient(url=f"127.0.0.1:{secured.port}")) as client:
        assert client.is_server_live() and client.is_server_ready()  # probes need no token
        inputs, feeds = _fraud_inputs()
        expected = ort_run(repository / "fraud_detection" / "2.0.0" / "model.onnx", feeds)
        result = client.infer("fraud_detection", inputs, model_version="2.0.0", headers=infer)
        np.testing.assert_allclose(
            result.as_numpy("fraud_probability"), expected["fraud_probability"], rtol=1e-6
        )
        with pytest.raises(InferenceServerException, match="missing bearer token"):
            client.infer("fraud_detection", inputs, model_version="2.0.0")
        with pytest.raises(InferenceServerException, match="invalid bearer token"):
            client.get_model_metadata("fraud_detection", headers=headers("x" * 20))

        # Repository extension: admin loads and unloads, an inference token may not.
        with pytest.raises(InferenceServerException, match="admin scope"):
            client.load_model("linear", headers=infer)
        with pytest.raises(InferenceServerException, match="missing bearer token"):
            client.load_model("linear")
        client.load_model("linear", headers=admin)  # the newest version: 2
        assert client.is_model_ready("linear", "2", headers=infer)
        x = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("linear", [inp], model_version="2", headers=infer)
        want = ort_run(repository / "linear" / "2" / "model.onnx", {"x": x})
        np.testing.assert_allclose(result.as_numpy("scores"), want["scores"], rtol=1e-6)
        with pytest.raises(InferenceServerException, match="admin scope"):
            client.unload_model("linear", headers=infer)
        client.unload_model("linear", headers=admin)
        assert not client.is_model_ready("linear", "2", headers=infer)

        # System shared memory: register/unregister are admin, status is inference.
        key = f"/ms_auth_{secrets.token_hex(4)}"
        handle = shm.create_shared_memory_region("auth_in", key, x.nbytes)
        try:
            with pytest.raises(InferenceServerException, match="missing bearer token"):
                client.register_system_shared_memory("auth_in", key, x.nbytes)
            with pytest.raises(InferenceServerException, match="admin scope"):
                client.register_system_shared_memory("auth_in", key, x.nbytes, headers=infer)
            client.register_system_shared_memory("auth_in", key, x.nbytes, headers=admin)
            status = client.get_system_shared_memory_status(headers=infer)
            assert [r["name"] for r in status] == ["auth_in"]
            with pytest.raises(InferenceServerException, match="admin scope"):
                client.unregister_system_shared_memory("auth_in", headers=infer)
            client.unregister_system_shared_memory("auth_in", headers=admin)
            assert client.get_system_shared_memory_status(headers=infer) == []
        finally:
            with contextlib.suppress(InferenceServerException):
                client.unregister_system_shared_memory(headers=admin)
            shm.destroy_shared_memory_region(handle)


def test_readme_security_example_runs(
    secured: Server, repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Security example (tritonclient with tokens from files) runs as written."""
    readme = README.read_text()
    security = readme[readme.index("## Security") : readme.index("## Settings")]
    blocks = re.findall(r"```py\n(.*?)```", security, re.S)
    assert len(blocks) == 1
    (tmp_path / "admin-tokens").write_text(ADMIN + "\n")
    (tmp_path / "inference-tokens").write_text(INFER + "\n")
    monkeypatch.chdir(tmp_path)
    values, _ = printed_numbers(blocks[0].replace("localhost:8001", f"127.0.0.1:{secured.port}"))
    np.testing.assert_allclose(values, fraud_expected(repository), rtol=1e-5)


def _wait_for_log(server: Server, pattern: str) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [server.log()]
        return pattern in found[0]

    server.wait_for(seen, 15, f"{pattern!r} in the server log")
    return found[0]


def test_a_crlf_in_the_path_does_not_forge_a_log_line(secured: Server) -> None:
    marker = secrets.token_hex(4)
    forged = f"/v1/models%0d%0aFORGED-{marker}%20INFO%20admin%20logged%20in%0a%e2%80%a8"
    with httpx.Client(base_url=secured.url, timeout=30) as client:
        response = client.get(forged, headers=headers(INFER))
    assert response.status_code == 404
    log = _wait_for_log(secured, f"FORGED-{marker}")
    lines = [line for line in log.splitlines() if f"FORGED-{marker}" in line]
    assert len(lines) == 1, lines
    assert f"GET /v1/models\\r\\nFORGED-{marker} INFO admin logged in\\n\\u2028 404" in lines[0]
    assert not lines[0].startswith("FORGED")


def test_tokens_never_reach_the_log(secured: Server) -> None:
    # Requests with right and wrong tokens were made above (this test runs after them).
    secured.client.post("/v1/models/load", json={"model_id": "x"}, headers=headers(INFER + "-wrong"))
    log = secured.log()
    assert "model_server.access" in log  # the access log is on: the check below means something
    for token in (ADMIN, ADMIN_2, INFER):
        assert token not in log


def test_tokens_from_files_as_a_secret_mounts_them(repository: Path, tmp_path: Path) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "admin-tokens").write_text(f"# model-server admin\n{ADMIN}\n")
    (secret_dir / "inference-tokens").write_text(f"{INFER}\n")
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_ADMIN_TOKENS_FILE=secret_dir / "admin-tokens",
        MODEL_SERVER_INFERENCE_TOKENS_FILE=secret_dir / "inference-tokens",
    )
    try:
        srv.start()
        load = {"model_id": "linear", "version": "1"}
        assert srv.client.post("/v1/models/load", json=load).status_code == 401
        assert srv.client.post("/v1/models/load", json=load, headers=headers(INFER)).status_code == 403
        assert srv.client.post("/v1/models/load", json=load, headers=headers(ADMIN)).status_code == 200
        assert srv.client.get("/v1/models").status_code == 401
        assert srv.client.get("/v1/models/linear/1", headers=headers(INFER)).status_code == 200
        assert srv.client.get("/metrics").status_code == 200  # open by default, for scrapers
        assert srv.client.delete("/v1/models/linear/1", headers=headers(ADMIN)).status_code == 200
        log = srv.log()
        assert ADMIN not in log and INFER not in log
    finally:
        srv.stop()


def test_loopback_default_without_tokens_keeps_admin_open(repository: Path) -> None:
    """`make serve`: loopback, no tokens, every route works as before (non-loopback: tests/frontend)."""
    srv = Server(repository, workers=1)
    try:
        srv.start()
        load = srv.client.post("/v2/repository/models/linear/load", json={})
        assert load.status_code == 200, load.text
        assert srv.client.get("/v2/models/linear/ready").status_code == 200
        assert srv.client.post("/v2/repository/models/linear/unload", json={}).status_code == 200
        assert re.search(r"frontend", srv.log())
    finally:
        srv.stop()
