"""Contract = behaviour: the OpenAPI document is judged against the real stack.

schemathesis generates requests for every documented operation from
``/openapi.json`` and checks that no answer is a 5xx, that every status is
documented for its operation and that every answer fits its documented
schema. The stack is this module's own (the demo model loaded at start), so
the unloads and loads it generates disturb no other test. The run is bounded:
a fixed number of examples per operation, derandomized (the same cases on every
run, so a failure reproduces), no shrinking (its cost is unbounded), and every
request has a timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from frontend.app import create_app
from model_server import demo
from tests.models import ort_run

from .server import Server

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "contract-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXAMPLES_PER_OPERATION = 25
REQUEST_TIMEOUT_S = 30.0


def _closed_port() -> int:
    """A loopback port nothing listens on: S3 URIs the generator invents are refused at once, locally."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def contract_server(repository: Path) -> Iterator[Server]:
    models_file = repository.parent / "contract-models.yaml"
    models_file.write_text(f'models:\n  - model_id: {demo.MODEL_ID}\n    version: "{demo.VERSION}"\n')
    srv = Server(
        repository,
        workers=2,
        MODEL_SERVER_MODELS_FILE=models_file,
        MODEL_SERVER_ADMIN_TOKENS=ADMIN_TOKEN,  # read once the auth branch lands; harmless before
        # On, so the shared-memory routes are judged by what they do rather than by their 501.
        MODEL_SERVER_ALLOW_CLIENT_SHM="true",
        MODEL_SERVER_MAX_REQUEST_BYTES=1024 * 1024,
        MODEL_SERVER_DOWNLOAD_TIMEOUT_S=5,
        MODEL_SERVER_LOAD_TIMEOUT_S=30,
        # Generated registry URIs must never leave the machine: S3 goes to a closed loopback
        # port with dummy credentials (no instance-metadata lookup), MLflow is not configured.
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}",
        AWS_ACCESS_KEY_ID="contract",
        AWS_SECRET_ACCESS_KEY="contract",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_MAX_ATTEMPTS=1,
    )
    srv.env.pop("MLFLOW_TRACKING_URI", None)
    srv.env.pop("MODEL_SERVER_MLFLOW_TRACKING_URI", None)
    srv.env.pop("AWS_S3_BUCKET", None)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
    assert srv.shm_segments() == []


@pytest.fixture(scope="module")
def api_schema(contract_server: Server) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json", headers=AUTH, timeout=10)


def _on_demo_model(case: Case[Any]) -> Case[Any]:
    params = case.path_parameters
    if params is not None:
        params["model"] = demo.MODEL_ID
        if "version" in params:
            params["version"] = demo.VERSION
    return case


# One test per documented operation, listed from the application itself (no server needed to
# collect them); schemathesis' own pytest loader does not run under pytest 9.
OPERATIONS = sorted(
    (path, method.upper())
    for path, operations in create_app().openapi()["paths"].items()
    for method in operations
)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_every_operation_keeps_its_contract(api_schema: BaseSchema, path: str, method: str) -> None:
    operation = api_schema[path][method]
    generated = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )
    # Invented model names mostly meet a 404; half the cases of a model's routes name the demo
    # model instead, so what its handlers do with generated bodies and parameters is judged too.
    # (The repository routes keep invented names: an unload of the demo would only mean 404s.)
    on_demo = "{model}" in path and not path.startswith("/v2/repository")
    cases = st.one_of(generated, generated.map(_on_demo_model)) if on_demo else generated
    _judge(cases, EXAMPLES_PER_OPERATION)
    # Then every example the document gives, as a client copying it would send it.
    for explicit in api_schema.get_strategies_from_examples(operation):
        _judge(explicit.map(_on_demo_model) if on_demo else explicit, 1)


def _judge(cases: st.SearchStrategy[Case[Any]], count: int) -> None:
    @settings(
        max_examples=count,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,  # nothing written into the working tree
        phases=[Phase.explicit, Phase.generate],  # no shrinking: its cost is unbounded
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def conforms(case: Case[Any]) -> None:
        case.call_and_validate(
            headers=AUTH,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            timeout=REQUEST_TIMEOUT_S,
        )

    conforms()


def test_the_demo_model_still_serves_after_the_run(contract_server: Server, repository: Path) -> None:
    """Whatever the generated requests did, the server still answers correctly and no worker died."""
    c = contract_server.client
    # The generator may have unloaded the demo model: load it again (idempotent if still loaded).
    r = c.post("/v1/models/load", json={"model_id": demo.MODEL_ID, "version": demo.VERSION}, headers=AUTH)
    assert r.status_code == 200, r.text
    records = [{"feature1": 120.5, "feature2": 3.0}, {"feature1": 9.99, "feature2": 14.0}]
    path = repository / demo.MODEL_ID / demo.VERSION / "model.onnx"
    feeds = {f: np.array([[r[f]] for r in records], dtype=np.float32) for f in ("feature1", "feature2")}
    expected = ort_run(path, feeds)
    got = c.post(
        "/v1/infer",
        json={"model_id": demo.MODEL_ID, "model_version": demo.VERSION, "inputs": records},
        headers=AUTH,
    )
    assert got.status_code == 200, got.text
    for row, out in enumerate(got.json()["outputs"]):
        for name, value in out.items():
            np.testing.assert_allclose(value, expected[name][row], rtol=1e-5)
    # No worker was restarted since the server started (the coordinator counts every comeback).
    restarts = [
        line
        for line in c.get("/metrics", headers=AUTH).text.splitlines()
        if line.startswith("model_server_worker_restarts_total{")
    ]
    assert len(restarts) == 2, restarts
    assert all(line.endswith(" 0.0") for line in restarts), restarts


@pytest.mark.parametrize(
    ("method", "path", "allow", "v2"),
    [
        # FastAPI routes; one path served by two routes lists both methods.
        ("PUT", "/v1/models/fraud_detection/2.0.0", "DELETE, GET", False),
        ("DELETE", "/health", "GET", False),
        ("POST", "/v1/models", "GET", False),
        ("GET", "/v2/repository/index", "POST", True),
        ("PATCH", "/v2/models/fraud_detection", "GET", True),
        # Paths the inference fast path serves for POST.
        ("GET", "/v1/infer", "POST", False),
        ("PUT", "/v2/models/fraud_detection/infer", "POST", True),
        ("GET", "/v2/models/fraud_detection/versions/2.0.0/infer", "POST", True),
    ],
)
def test_wrong_method_is_405_with_allow(
    contract_server: Server, method: str, path: str, allow: str, v2: bool
) -> None:
    r = contract_server.client.request(method, path, headers=AUTH)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    body = r.json()
    if v2:
        assert isinstance(body["error"], str)
    else:
        assert body["error"]["code"] == "method_not_allowed"
        assert body["error"]["request_id"] == r.headers["x-request-id"]


def test_every_operation_documents_its_error_statuses(contract_server: Server) -> None:
    """The statuses the handlers raise are in the document, with the error shape of the route's API."""
    spec = httpx.get(f"{contract_server.url}/openapi.json", headers=AUTH, timeout=10).json()
    expected = {
        ("/v1/models/load", "post"): {"400", "403", "404", "409", "413", "422", "502", "503", "504", "507"},
        ("/v1/infer", "post"): {"400", "404", "409", "413", "422", "503", "504"},
        ("/v1/models/{model_id}/{version}", "get"): {"404", "503"},
        ("/v1/models/{model_id}/{version}", "delete"): {"404", "409", "503"},
        ("/v2/models/{model}/infer", "post"): {"400", "404", "409", "413", "501", "503", "504"},
        ("/v2/models/{model}/ready", "get"): {"400", "404", "503"},
        ("/v2/repository/models/{model}/load", "post"): {"400", "403", "404", "409", "502", "503", "504"},
        ("/v2/systemsharedmemory/region/{name}/register", "post"): {"400", "501", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, method, sorted(responses))
        shape = "V2ErrorResponse" if path.startswith("/v2") else "ErrorResponse"
        for status in statuses - {"400"} if path.endswith("/ready") else statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(f"/{shape}"), (path, method, status, ref)
