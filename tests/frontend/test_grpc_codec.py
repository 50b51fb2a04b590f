"""The pure parts of the gRPC frontend: messages to ``InferenceCall``, results to messages,
HTTP statuses to gRPC codes, and the REST access decision applied to ``authorization`` metadata."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from frontend.auth import AuthMiddleware, AuthPolicy, AuthScope
from frontend.coordinator_client import CoordinatorUnavailable
from frontend.errors import ApiError, describe
from frontend.grpc import grpc_service_pb2 as pb
from frontend.grpc_codec import (
    decode_infer,
    decode_inputs,
    decode_output,
    error_stream_response,
    grpc_status,
)
from frontend.grpc_server import SCOPES, SERVICE_NAME, UNARY, auth_refusal, bind_address
from ipc import datatypes
from model_server.settings import Settings

ADMIN = "admin-token-0123456789abcdef"
INFER = "infer-token-0123456789abcdef"


def _request(**inputs: dict[str, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, spec in inputs.items():
        tensor = request.inputs.add(name=name, datatype=spec["datatype"], shape=spec["shape"])
        for key, value in spec.get("parameters", {}).items():
            param = tensor.parameters[key]
            if isinstance(value, str):
                param.string_param = value
            else:
                param.int64_param = value
        if "contents" in spec:
            field, values = spec["contents"]
            getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.NOT_FOUND),
        (409, grpc.StatusCode.UNAVAILABLE),
        (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (501, grpc.StatusCode.UNIMPLEMENTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, grpc.StatusCode.INTERNAL),
        (418, grpc.StatusCode.INTERNAL),
    ],
)
def test_http_status_to_grpc_code(status: int, code: grpc.StatusCode) -> None:
    assert grpc_status(status) is code


def test_describe_maps_the_errors_the_api_raises_and_nothing_else() -> None:
    api = ApiError(404, "model_not_found", "model x is not loaded")
    assert describe(api) is api
    dispatch = describe(ApiError(503, "no_worker", "no worker holds the model", retry_after=1))
    assert dispatch is not None and (dispatch.status, dispatch.message) == (503, "no worker holds the model")
    lost = describe(CoordinatorUnavailable("coordinator did not answer"))
    assert lost is not None and lost.status == 503 and lost.retry_after == 1
    assert describe(ValueError("a bug")) is None


def test_raw_contents_go_in_order_to_inputs_without_other_data() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1], [2]], dtype=np.int64)
    request = _request(
        a={"datatype": "FP32", "shape": [2, 3]},
        r={
            "datatype": "FP32",
            "shape": [2, 3],
            "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 24},
        },
        b={"datatype": "INT64", "shape": [2, 1]},
    )
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    inputs = decode_inputs(request, shm_enabled=True)
    assert [i.name for i in inputs] == ["a", "r", "b"]
    assert inputs[0].raw == a.tobytes() and inputs[2].raw == b.tobytes()
    assert inputs[1].region is not None and (inputs[1].region.name, inputs[1].region.byte_size) == ("in", 24)
    assert inputs[1].raw is None


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1.5, -2.0], np.float64),
        ("INT8", "int_contents", [-3, 7], np.int8),
        ("INT32", "int_contents", [-3, 7], np.int32),
        ("INT64", "int64_contents", [-(2**40), 7], np.int64),
        ("UINT16", "uint_contents", [3, 65535], np.uint16),
        ("UINT64", "uint64_contents", [3, 2**63], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ],
)
def test_typed_contents_become_arrays(datatype: str, field: str, values: list[Any], dtype: Any) -> None:
    inputs = decode_inputs(
        _request(t={"datatype": datatype, "shape": [2, 1], "contents": (field, values)}), False
    )
    assert inputs[0].array is not None
    np.testing.assert_array_equal(inputs[0].array, np.array(values, dtype=dtype).reshape(2, 1))
    assert inputs[0].array.dtype == dtype


def test_typed_bytes_are_packed_as_the_binary_extension_packs_them() -> None:
    values = [b"a", b"", "ünï".encode()]
    inputs = decode_inputs(
        _request(t={"datatype": "BYTES", "shape": [3], "contents": ("bytes_contents", values)}), False
    )
    assert inputs[0].raw is not None
    assert list(datatypes.deserialize_bytes(inputs[0].raw, 3)) == values


@pytest.mark.parametrize(
    ("spec", "raw", "message"),
    [
        (
            {"datatype": "FP32", "shape": [2], "contents": ("fp32_contents", [1.0])},
            [],
            "1 fp32_contents elements",
        ),
        (
            {"datatype": "INT8", "shape": [1], "contents": ("int_contents", [300])},
            [],
            "out of range for INT8",
        ),
        (
            {"datatype": "FP16", "shape": [1], "contents": ("fp32_contents", [1.0])},
            [],
            "send raw_input_contents",
        ),
        ({"datatype": "FP32", "shape": [1], "contents": ("fp32_contents", [1.0])}, [b"x"], "cannot be mixed"),
        ({"datatype": "FP32", "shape": [1]}, [], "has no data"),
        ({"datatype": "FP32", "shape": [1]}, [b"1234", b"5678"], "2 raw_input_contents given for 1 input"),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}},
            [],
            "shared_memory_byte_size is required",
        ),
    ],
)
def test_malformed_inputs_are_400_naming_the_problem(
    spec: dict[str, Any], raw: list[bytes], message: str
) -> None:
    request = _request(t=spec)
    request.raw_input_contents.extend(raw)
    with pytest.raises(ApiError, match=message) as exc:
        decode_inputs(request, shm_enabled=True)
    assert exc.value.status == 400


def test_shared_memory_is_501_when_off() -> None:
    spec = {
        "datatype": "FP32",
        "shape": [1],
        "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4},
    }
    with pytest.raises(ApiError, match="MODEL_SERVER_ALLOW_CLIENT_SHM") as exc:
        decode_inputs(_request(t=spec), shm_enabled=False)
    assert exc.value.status == 501


def test_outputs_classification_and_regions() -> None:
    out = pb.ModelInferRequest.InferRequestedOutputTensor(name="scores")
    out.parameters["classification"].int64_param = 2
    assert decode_output(out, False).classification == 2
    out.parameters["classification"].int64_param = 0
    with pytest.raises(ApiError, match="at least 1"):
        decode_output(out, False)
    shm_out = pb.ModelInferRequest.InferRequestedOutputTensor(name="scores")
    shm_out.parameters["shared_memory_region"].string_param = "out"
    shm_out.parameters["shared_memory_byte_size"].int64_param = 48
    shm_out.parameters["shared_memory_offset"].int64_param = 16
    region = decode_output(shm_out, True).region
    assert region is not None and (region.name, region.offset, region.byte_size) == ("out", 16, 48)


def test_deadline_and_timeout_parameter_the_tighter_wins() -> None:
    request = _request(x={"datatype": "FP32", "shape": [1]})
    request.raw_input_contents.append(b"\0\0\0\0")
    request.id, request.model_version = "req-1", "3"
    call = decode_infer(request, False, "trace", 2.5)
    assert (call.model, call.version, call.id, call.request_id, call.timeout_s) == (
        "m",
        "3",
        "req-1",
        "trace",
        2.5,
    )
    request.parameters["timeout"].int64_param = 500_000  # microseconds
    assert decode_infer(request, False, "t", 2.5).timeout_s == 0.5
    assert decode_infer(request, False, "t", 0.1).timeout_s == 0.1
    assert decode_infer(request, False, "t", None).timeout_s == 0.5
    request.parameters["timeout"].string_param = "soon"
    with pytest.raises(ApiError, match=r"parameters\.timeout"):
        decode_infer(request, False, "t", None)


def test_stream_error_names_the_request() -> None:
    request = pb.ModelInferRequest(model_name="m", model_version="1", id="r7")
    response = error_stream_response(request, "model m:1 is not loaded")
    assert response.error_message == "model m:1 is not loaded"
    assert (response.infer_response.id, response.infer_response.model_name) == ("r7", "m")


def test_bind_address() -> None:
    assert bind_address("127.0.0.1", 8002) == "127.0.0.1:8002"
    assert bind_address("::1", 8002) == "[::1]:8002"


def test_every_served_rpc_is_in_the_protocol_and_admin_rpcs_need_admin() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(UNARY) | {"ModelStreamInfer"} <= methods
    assert pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE_NAME
    admin = {name for name, scope in SCOPES.items() if scope is AuthScope.ADMIN}
    assert admin == {
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
    }


def _checker(settings: Settings) -> AuthMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    return AuthMiddleware(app, AuthPolicy(settings))


def test_tokens_and_scopes_as_rest() -> None:
    checker = _checker(Settings(host="0.0.0.0", admin_tokens=ADMIN, inference_tokens=INFER))
    assert auth_refusal(checker, AuthScope.OPEN, None) is None
    assert auth_refusal(checker, AuthScope.INFERENCE, None) == (
        401,
        "missing bearer token: send the header `Authorization: Bearer <token>`",
    )
    assert auth_refusal(checker, AuthScope.INFERENCE, "Bearer not-a-known-token-000000") == (
        401,
        "invalid bearer token",
    )
    assert auth_refusal(checker, AuthScope.INFERENCE, f"Basic {INFER}") == (401, "invalid bearer token")
    assert auth_refusal(checker, AuthScope.INFERENCE, f"Bearer {INFER}") is None
    assert auth_refusal(checker, AuthScope.INFERENCE, f"bearer {ADMIN}") is None
    assert auth_refusal(checker, AuthScope.ADMIN, f"Bearer {INFER}") == (
        403,
        "this token does not have the admin scope",
    )
    assert auth_refusal(checker, AuthScope.ADMIN, f"Bearer {ADMIN}") is None


def test_admin_is_off_on_a_public_address_without_admin_tokens() -> None:
    checker = _checker(Settings(host="0.0.0.0"))
    assert auth_refusal(checker, AuthScope.INFERENCE, None) is None
    refused = auth_refusal(checker, AuthScope.ADMIN, None)
    assert refused is not None and refused[0] == 403 and "MODEL_SERVER_ADMIN_TOKENS" in refused[1]
    assert auth_refusal(_checker(Settings(host="127.0.0.1")), AuthScope.ADMIN, None) is None
