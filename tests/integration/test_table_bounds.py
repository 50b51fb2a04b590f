"""The model table and the loads stay bounded against a client that loads whatever it likes
(issue 10, item 4), on the real stack: out-of-bounds load options are 4xx naming the field,
failed loads do not pile up in the table or in /metrics, the server holds at most
MODEL_SERVER_MAX_MODELS models, and loads from a source that never answers neither hang
nor keep a local load waiting."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.models import ort_run
from tests.services import DUMMY_KEY_ID, DUMMY_SECRET, REGION, blackhole

from .server import Server

DEMO = ("fraud_detection", "2.0.0")
FEEDS = {
    "feature1": np.array([[1.0], [3.0]], np.float32),
    "feature2": np.array([[2.0], [4.0]], np.float32),
}
MAX_FAILED = 20
MAX_MODELS = 3
STALL_S = 15  # MODEL_SERVER_DOWNLOAD_TIMEOUT_S of the hung-source server


@pytest.fixture(scope="module")
def bounded(repository: Path) -> Iterator[Server]:
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_MAX_FAILED_ENTRIES=MAX_FAILED,
        MODEL_SERVER_MAX_MODELS=MAX_MODELS,
        # Bounds what the old code's hang on `replicas: -1` cost (600 s by default).
        MODEL_SERVER_LOAD_TIMEOUT_S=30,
    )
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def serves_the_demo_model(server: Server, repository: Path) -> None:
    """The demo model loads (or is loaded) and answers what onnxruntime answers."""
    loaded = server.client.post("/v1/models/load", json={"model_id": DEMO[0], "version": DEMO[1]})
    assert loaded.status_code == 200, loaded.text
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": [2, 1], "data": value.ravel().tolist()}
            for name, value in FEEDS.items()
        ]
    }
    answer = server.client.post(f"/v2/models/{DEMO[0]}/versions/{DEMO[1]}/infer", json=body)
    assert answer.status_code == 200, answer.text
    expected = ort_run(repository / DEMO[0] / DEMO[1] / "model.onnx", dict(FEEDS))
    for output in answer.json()["outputs"]:
        np.testing.assert_allclose(
            np.array(output["data"]).reshape(output["shape"]), expected[output["name"]], rtol=1e-5
        )


def error_message(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error if isinstance(error, str) else str(error["message"])


# --------------------------------------------------------------------------- load options


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_batch_size": 1e20}, "max_batch_size"),
        ({"max_batch_size": 10**20}, "max_batch_size"),  # a JSON integer: msgpack overflowed (500)
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"replicas": -1}, "replicas"),
        ({"replicas": 1e20}, "replicas"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"max_queue_delay_us": 1e15}, "max_queue_delay_us"),
        ({"max_queue_size": 1e20}, "max_queue_size"),
        ({"preferred_batch_sizes": [4, -2]}, "preferred_batch_sizes.1"),
        ({"preferred_batch_sizes": [1e20]}, "preferred_batch_sizes.0"),
        ({"model_id": "a/b"}, "model_id"),
        ({"model_id": "bad\x01id"}, "model_id"),
        ({"model_id": "m" * 129}, "model_id"),
        ({"version": "1\n2"}, "version"),
        ({"version": "v" * 129}, "version"),
        ({"registry_uri": "/x" * 4000}, "registry_uri"),
    ],
)
def test_v1_load_options_out_of_bounds_are_422_naming_the_field(
    bounded: Server, options: dict[str, Any], field: str
) -> None:
    body = {"model_id": DEMO[0], "version": DEMO[1], **options}
    response = bounded.client.post("/v1/models/load", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field}: ") or field in str(error["details"]), error


@pytest.mark.parametrize(
    ("model", "parameters", "field"),
    [
        (DEMO[0], {"version": DEMO[1], "replicas": -1}, "parameters.replicas"),
        (DEMO[0], {"version": DEMO[1], "max_batch_size": 1e20}, "parameters.max_batch_size"),
        (DEMO[0], {"version": DEMO[1], "max_batch_size": 10**20}, "parameters.max_batch_size"),
        (DEMO[0], {"version": DEMO[1], "replicas": 10**20}, "parameters.replicas"),
        (DEMO[0], {"version": DEMO[1], "max_queue_size": -3}, "parameters.max_queue_size"),
        (
            DEMO[0],
            {"version": DEMO[1], "config": '{"max_batch_size": 1e20}'},
            "parameters.config.max_batch_size",
        ),
        (
            DEMO[0],
            {"version": DEMO[1], "config": {"dynamic_batching": {"max_queue_delay_microseconds": -1}}},
            "parameters.config.dynamic_batching.max_queue_delay_microseconds",
        ),
        (
            DEMO[0],
            {"version": DEMO[1], "config": {"dynamic_batching": {"preferred_batch_size": [0]}}},
            "parameters.config.dynamic_batching.preferred_batch_size[0]",
        ),
        (DEMO[0], {"version": "1\x07"}, "version"),
        (DEMO[0], {"version": "v" * 200}, "version"),
        (DEMO[0], {"version": DEMO[1], "registry_uri": "/x" * 4000}, "parameters.registry_uri"),
        ("bad%01name", {"version": "1"}, "model name"),
        ("m" * 129, {"version": "1"}, "model name"),
    ],
)
def test_v2_load_options_out_of_bounds_are_400_naming_the_field(
    bounded: Server, model: str, parameters: dict[str, Any], field: str
) -> None:
    response = bounded.client.post(f"/v2/repository/models/{model}/load", json={"parameters": parameters})
    assert response.status_code == 400, response.text
    assert error_message(response).startswith(field), response.text


def test_the_demo_model_serves_after_the_bad_loads(bounded: Server, repository: Path) -> None:
    serves_the_demo_model(bounded, repository)


# --------------------------------------------------------------------------- failed loads


def test_three_hundred_failed_loads_leave_the_table_and_metrics_bounded(
    bounded: Server, repository: Path
) -> None:
    client = bounded.client
    serves_the_demo_model(bounded, repository)
    metrics_before = client.get("/metrics").text
    for i in range(300):  # bounded: one request each
        failed = client.post("/v1/models/load", json={"model_id": f"ghost-{i}", "version": "1"})
        assert failed.status_code == 404, failed.text
    models = client.get("/v1/models").json()["models"]
    failed_entries = [m for m in models if m["state"] == "failed"]
    assert len(failed_entries) == MAX_FAILED
    assert {m["model_id"] for m in failed_entries} == {f"ghost-{i}" for i in range(300 - MAX_FAILED, 300)}
    assert len(models) <= MAX_FAILED + MAX_MODELS
    metrics_after = client.get("/metrics").text
    assert "ghost" not in metrics_after  # no series labelled by an id that never loaded
    not_found = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics_after.splitlines()
        if line.startswith('model_server_model_load_failures_total{reason="not_found"}')
    ]
    assert not_found and not_found[0] >= 300
    series_before = {line.split(" ")[0] for line in metrics_before.splitlines() if not line.startswith("#")}
    series_after = {line.split(" ")[0] for line in metrics_after.splitlines() if not line.startswith("#")}
    assert len(series_after - series_before) <= 5  # the failure counter's own series, not one per id
    # Unknown models: 404, and the frontends still route the demo model.
    for name in ("nope", "ghost-0", "ghost-299"):
        unknown = client.post(
            "/v1/infer", json={"model_id": name, "inputs": [{"feature1": 1.0, "feature2": 2.0}]}
        )
        assert unknown.status_code in {404, 409}, unknown.text
    serves_the_demo_model(bounded, repository)


def test_models_past_max_models_are_refused_with_409(bounded: Server, repository: Path) -> None:
    client = bounded.client
    serves_the_demo_model(bounded, repository)
    for version in ("1", "2"):
        loaded = client.post("/v1/models/load", json={"model_id": "linear", "version": version})
        assert loaded.status_code == 200, loaded.text
    full = client.post("/v1/models/load", json={"model_id": "credit", "version": "1"})
    assert full.status_code == 409, full.text
    assert full.json()["error"]["code"] == "too_many_models"
    assert "MODEL_SERVER_MAX_MODELS" in full.json()["error"]["message"]
    v2_full = client.post("/v2/repository/models/credit/load", json={"parameters": {"version": "1"}})
    assert v2_full.status_code == 409 and "MODEL_SERVER_MAX_MODELS" in error_message(v2_full)
    assert client.delete("/v1/models/linear/2").status_code == 200
    loaded = client.post("/v1/models/load", json={"model_id": "credit", "version": "1"})
    assert loaded.status_code == 200, loaded.text
    for model, version in (("credit", "1"), ("linear", "1")):
        assert client.delete(f"/v1/models/{model}/{version}").status_code == 200
    serves_the_demo_model(bounded, repository)


# --------------------------------------------------------------------------- slow sources


def test_a_source_that_never_answers_blocks_no_local_load(repository: Path) -> None:
    """Four loads from an S3 endpoint that accepts and never answers (more than one source may
    run at once) fail with 504 after MODEL_SERVER_DOWNLOAD_TIMEOUT_S without progress, while a
    local load answers meanwhile."""
    with blackhole() as url:
        aws = {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        server = Server(repository, workers=1, MODEL_SERVER_DOWNLOAD_TIMEOUT_S=STALL_S, **aws)
        try:
            server.start()
            answers: dict[int, httpx.Response] = {}
            lock = threading.Lock()

            def remote_load(i: int) -> None:
                with httpx.Client(base_url=server.url, timeout=300) as client:
                    response = client.post(
                        "/v1/models/load",
                        json={"model_id": f"remote-{i}", "version": "1", "registry_uri": f"s3://hung/m{i}/"},
                    )
                with lock:
                    answers[i] = response

            threads = [threading.Thread(target=remote_load, args=(i,), daemon=True) for i in range(4)]
            for thread in threads:
                thread.start()

            def all_four_pending() -> bool:
                models: list[dict[str, Any]] = server.client.get("/v1/models").json()["models"]
                return sum(str(m["model_id"]).startswith("remote-") for m in models) == 4

            server.wait_for(all_four_pending, 60, "the four remote loads to start")
            local = server.client.post("/v1/models/load", json={"model_id": DEMO[0], "version": DEMO[1]})
            with lock:
                answered_before_local = dict(answers)
            assert local.status_code == 200, local.text
            # The local load did not wait for the hung source: no remote load had failed yet.
            assert answered_before_local == {}
            serves_the_demo_model(server, repository)
            for thread in threads:
                thread.join(timeout=120)
            assert sorted(answers) == [0, 1, 2, 3]
            for response in answers.values():
                assert response.status_code == 504, response.text
                assert f"sent nothing for {STALL_S} s" in response.json()["error"]["message"]
            states = {m["model_id"]: m["state"] for m in server.client.get("/v1/models").json()["models"]}
            assert all(states[f"remote-{i}"] == "failed" for i in range(4))
        finally:
            server.stop()
