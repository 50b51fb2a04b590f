"""The protocol-neutral pieces of the frontend: one error type rendered per protocol, the V2
codec's decoding into an ``InferenceCall``, JSON tensor values, and route pairs registered once."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from fastapi.routing import iter_route_contexts

from frontend.app import create_app
from frontend.call import InferenceCall
from frontend.coordinator_client import CoordinatorUnavailable
from frontend.errors import ApiError, describe, render
from frontend.tensors import from_json, from_raw_json
from frontend.v2_codec import decode
from model_server.settings import Settings


def test_one_error_type_and_describe_for_other_protocols() -> None:
    error = ApiError(409, "model_unloading", "model m:1 is being unloaded", {"state": "unloading"})
    assert describe(error) is error
    lost = describe(CoordinatorUnavailable("coordinator did not answer within 5 s"))
    assert lost is not None and (lost.status, lost.code, lost.retry_after) == (
        503,
        "coordinator_unavailable",
        1,
    )
    assert lost.message == "coordinator did not answer within 5 s"
    assert describe(ValueError("a bug")) is None


def test_rendered_per_protocol_in_one_place() -> None:
    error = ApiError(422, "invalid_input", "input 'x': bad", {"row": 1}, retry_after=2.4)
    v1 = render("/v1/infer", error)
    assert v1.status_code == 422 and v1.headers["retry-after"] == "2"
    body = orjson.loads(v1.body)
    assert body["error"]["code"] == "invalid_input" and body["error"]["details"] == {"row": 1}
    assert body["error"]["message"] == "input 'x': bad"
    v2 = render("/v2/models/m/infer", error)
    assert v2.status_code == 400 and orjson.loads(v2.body) == {"error": "input 'x': bad"}
    bug = render("/v2/models/m/infer", KeyError("secret"))
    assert bug.status_code == 500 and orjson.loads(bug.body) == {"error": "internal error: KeyError"}


def _decode(header: dict[str, object], binary: bytes = b"", shm: bool = False) -> InferenceCall:
    head = orjson.dumps(header)
    call = InferenceCall("m", None, [])
    decode(head + binary, len(head) if binary else None, call, shm)
    return call


def test_v2_decode_keeps_json_raw_and_slices_binary() -> None:
    x = np.arange(6, dtype=np.float32)
    call = _decode(
        {
            "id": 7,
            "parameters": {"timeout": 250_000},
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]},
                {"name": "b", "datatype": "FP32", "shape": [6], "parameters": {"binary_data_size": 24}},
            ],
            "outputs": [{"name": "y", "parameters": {"classification": 2}}],
        },
        x.tobytes(),
    )
    a, b = call.inputs
    assert a.array is None and a.json is not None  # converted only by execute, after the checks
    np.testing.assert_array_equal(from_raw_json(a.json, "FP32", a.shape, "a"), x.reshape(2, 3) + 1)
    assert b.raw is not None and bytes(b.raw) == x.tobytes()
    assert (call.id, call.timeout_s, call.outputs[0].classification) == ("7", 0.25, 2)


@pytest.mark.parametrize(
    ("header", "status", "fragment"),
    [
        ({"inputs": []}, 400, "non-empty 'inputs'"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [True]}]}, 400, "$.inputs[0].shape[0]"),
        (
            {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}], "parameters": []},
            400,
            "$.parameters",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "a",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            },
            501,
            "MODEL_SERVER_ALLOW_CLIENT_SHM",
        ),
        (
            {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}], "parameters": {"timeout": -1}},
            400,
            "timeout",
        ),
    ],
)
def test_v2_decode_refuses_malformed_envelopes(header: dict[str, object], status: int, fragment: str) -> None:
    with pytest.raises(ApiError) as refused:
        _decode(header)
    assert refused.value.status == status and fragment in refused.value.message


def test_json_values_v2_strict_v1_lenient() -> None:
    with pytest.raises(ApiError, match="BOOL data must be true/false"):
        from_json([0, 1], "BOOL", "input 'b'", [2])
    assert from_json([0, 1], "BOOL", "feature 'b'", lenient=True).tolist() == [False, True]
    with pytest.raises(ApiError, match="FP32 data must be numbers"):
        from_json([True, False], "FP32", "input 'x'", [2])
    with pytest.raises(ApiError, match="3 values do not fill shape"):
        from_json([[1, 2], [3]], "FP32", "input 'x'", [2, 2])
    assert from_json(["é", "b"], "BYTES", "input 's'", [1, 2]).tolist() == [["é".encode(), b"b"]]


def test_route_pairs_share_one_handler() -> None:
    routes = {
        (route.path, method): route.endpoint
        for route in iter_route_contexts(create_app(Settings(host="127.0.0.1")).routes)
        for method in route.methods or ()
    }
    for suffix, method in (
        ("", "GET"),
        ("/ready", "GET"),
        ("/config", "GET"),
        ("/stats", "GET"),
        ("/infer", "POST"),
    ):
        plain = routes[(f"/v2/models/{{model}}{suffix}", method)]
        assert routes[(f"/v2/models/{{model}}/versions/{{version}}{suffix}", method)] is plain
    assert routes[("/ready", "GET")] is routes[("/v2/health/ready", "GET")]
