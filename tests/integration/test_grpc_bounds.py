"""Bounds of the gRPC port: a client cannot hold more connections than
MODEL_SERVER_GRPC_MAX_CONNECTIONS, keep one idle or half-open for ever, nor hold one of the
concurrent RPCs by never finishing its request message."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg

from tests.models import ort_run

from .server import Server, started

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 2
IDLE_S = 1.5
HANDSHAKE_S = 1.0
MESSAGE_S = 1.5
# The client connection preface and an empty SETTINGS frame (RFC 9113 3.4): a valid HTTP/2
# start after which the client sends nothing.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def bounded(repository: Path) -> Iterator[Server]:
    srv = Server(
        repository,
        workers=1,
        MODEL_SERVER_FRONTEND_PROCESSES=1,  # one process: the bound is per frontend process
        MODEL_SERVER_GRPC_MAX_CONNECTIONS=MAX_CONNECTIONS,
        MODEL_SERVER_GRPC_CONNECTION_IDLE_S=IDLE_S,
        MODEL_SERVER_HEADER_TIMEOUT_S=HANDSHAKE_S,
        MODEL_SERVER_BODY_TIMEOUT_S=MESSAGE_S,
        MODEL_SERVER_GRPC_MAX_CONCURRENT_RPCS=1,
        MODEL_SERVER_ALLOWED_LOCAL_ROOTS=repository.parent,
    )
    with started(srv, ["linear"]):
        yield srv


def _infer(url: str, repository: Path) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    inp = tg.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    with contextlib.closing(tg.InferenceServerClient(url=url)) as c:
        got = c.infer("linear", [inp], client_timeout=20).as_numpy("scores")
    expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
    np.testing.assert_allclose(got, expected["scores"], rtol=1e-6)


def _closed_within(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the server closed ``sock`` (reading whatever it sent first), or None."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < limit_s:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def test_connections_beyond_the_bound_are_refused_and_freed_on_close(
    bounded: Server, repository: Path
) -> None:
    pids = {name: p.pid for name, p in bounded.processes().items()}
    # A local subchannel pool each: channels to one target otherwise share one connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    held = [grpc.insecure_channel(bounded.grpc_url, options=own_connection) for _ in range(MAX_CONNECTIONS)]
    try:
        for channel in held:
            grpc.channel_ready_future(channel).result(timeout=20)
        # tritonclient opens its own connection: one too many.
        with pytest.raises(tg.InferenceServerException) as exc:
            _infer(bounded.grpc_url, repository)
        assert str(exc.value.status()) == "StatusCode.UNAVAILABLE"
    finally:
        for channel in held:
            channel.close()
    # The server sees the closes and serves a new connection again (bounded wait for it).
    deadline = time.monotonic() + 10
    while True:
        try:
            _infer(bounded.grpc_url, repository)
            break
        except tg.InferenceServerException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert {name: p.pid for name, p in bounded.processes().items()} == pids  # nothing restarted


def test_an_idle_connection_is_closed(bounded: Server) -> None:
    host, port = bounded.grpc_url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(H2_PREFACE)
        waited = _closed_within(sock, IDLE_S + 10)
    assert waited is not None, "an idle HTTP/2 connection stayed open"


def test_a_silent_connection_is_closed_after_the_handshake_timeout(bounded: Server, repository: Path) -> None:
    host, port = bounded.grpc_url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        waited = _closed_within(sock, HANDSHAKE_S + 10)
    assert waited is not None, "a connection that never sent the HTTP/2 preface stayed open"
    _infer(bounded.grpc_url, repository)  # and it no longer holds a connection slot


def _literal(name: bytes, value: bytes) -> bytes:
    """One HPACK literal header field without indexing, new name (RFC 7541 6.2.2); short strings."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _headers_only_call(method: str) -> bytes:
    """The connection preface, then a HEADERS frame opening stream 1 for ``method`` that
    neither ends the stream nor is followed by the request message."""
    block = b"".join(
        _literal(n, v)
        for n, v in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", f"/inference.GRPCInferenceService/{method}".encode()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    end_headers = b"\x04"
    headers = len(block).to_bytes(3, "big") + b"\x01" + end_headers + (1).to_bytes(4, "big") + block
    return H2_PREFACE + headers


def test_a_request_message_that_never_arrives_gives_its_rpc_back(bounded: Server, repository: Path) -> None:
    host, port = bounded.grpc_url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_headers_only_call("ModelInfer"))
        # It holds the one concurrent RPC this server allows (bounded wait for the server to see it) ...
        deadline = time.monotonic() + 10
        while True:
            try:
                _infer(bounded.grpc_url, repository)
            except tg.InferenceServerException as exc:
                assert str(exc.status()) == "StatusCode.RESOURCE_EXHAUSTED"
                break
            assert time.monotonic() < deadline, "the headers-only call never took the RPC slot"
            time.sleep(0.05)
        # ... until MODEL_SERVER_BODY_TIMEOUT_S: then it is answered DEADLINE_EXCEEDED (grpc-status 4)
        # with the setting named, and the stream is reset.
        received = b""
        sock.settimeout(0.5)
        deadline = time.monotonic() + MESSAGE_S + 10
        while b"MODEL_SERVER_BODY_TIMEOUT_S" not in received and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                received += sock.recv(65536)
    assert b"MODEL_SERVER_BODY_TIMEOUT_S" in received and b"grpc-status\x014" in received
    _infer(bounded.grpc_url, repository)  # the slot is free again
