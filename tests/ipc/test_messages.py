"""Unit tests of ipc.messages: every Struct round-trips through msgpack, nothing is pickled."""

from __future__ import annotations

import inspect
import random
from typing import Any

import msgspec
import pytest

from ipc import messages as m

REF = m.TensorRef("x", "FP32", [2, 3], "msrv_i_f1_abc", 128, 24)
SPEC = m.TensorSpec("x", "FP32", [-1, 3])
SCHEMA = m.ModelSchema(
    inputs=[SPEC],
    outputs=[m.TensorSpec("y", "INT64", [-1])],
    feature_names=["a", "b", "c"],
    feature_types={"a": "FP32"},
    batched=True,
    metadata={"k": "v", "unicode": "é✓"},
)
CONFIG = m.ModelConfig(
    batching=m.BatchConfig(max_batch_size=8, max_queue_delay_us=100, preferred_batch_sizes=[4, 8]),
    replicas=2,
    warmup=False,
    startup=True,
)
ENTRY = m.ModelEntry(
    model_id="m",
    version="1",
    state="ready",
    registry_uri="s3://b/m/1",
    reason="",
    path="/cache/m.onnx",
    sha256="ab" * 32,
    size_bytes=1234,
    schema=SCHEMA,
    workers=[0, 2],
    loaded_at=1.5,
    load_ms=12.5,
    memory_bytes=99,
    config=CONFIG,
    progress={"percent": 50.0},
)
WORKER = m.WorkerState(0, 123, "ipc:///tmp/w0", "cpu:0", True, 1, [["m", "1"]], 1000, 2.0, 1)
REGION = m.ShmRegion("input0", "client_region_é", 64, 4096)
TABLE = m.TableSnapshot(3, False, ["no worker is alive"], [ENTRY], [WORKER], 12.0, [REGION], evictions=4)

# One instance of every Struct the module declares, with non-default values where possible.
SAMPLES: list[Any] = [
    REF,
    SPEC,
    SCHEMA,
    m.ModelSchema(inputs=[], outputs=[]),
    m.BatchConfig(1, 2, [3], 4),
    CONFIG,
    ENTRY,
    m.ModelEntry("m", "1", "failed", reason="nope", error_status=404),
    WORKER,
    m.InferRequest(1, "trace-é", "m", "1", [REF], ["y"], "msrv_i_f1_abc", 256, 512, 10**18, [REF]),
    m.InferRequest(2, "", "m", "1", [], [], "seg", 0, 0, 0),
    m.InferReply(1, m.Status.OK, "", [REF], "msrv_i_w2_1_3", 5, 6, 7),
    m.InferReply(2, m.Status.BAD_INPUT, "bad"),
    m.WorkerHello(0, 123, "ipc:///tmp/w0", "cuda:0", 4, 2**40),
    m.Heartbeat(0, 123, "ipc:///tmp/w0", "cpu:all", 2, 2**31, [["m", "1"], ["n", "2"]]),
    m.ModelLoaded(
        0, "m", "1", False, "too big", 507, memory_bytes=5, load_ms=1.5, warmup_ms=2.5, evicted=[["old", "1"]]
    ),
    m.ModelLoaded(1, "m", "1", True),
    m.ModelUnloaded(0, "m", "1", "unload"),
    m.WorkerGoodbye(0, 123, "recycle"),
    m.LoadModel("m", "1", "/p/model.onnx", CONFIG, SCHEMA),
    m.UnloadModel("m", "1"),
    m.ClientLoad(1, "m", "1", None, m.ModelConfig()),
    m.ClientLoad(2, "m", "1", "runs:/abc/model", CONFIG),
    m.ClientUnload(3, "m", "1"),
    m.ClientEnsure(4, "m", "1"),
    m.ClientGet(5),
    m.ClientLookup(9, "fraud", ""),
    m.ClientIndex(6),
    REGION,
    m.ClientShmRegister(9, REGION),
    m.ClientShmUnregister(10, ""),
    m.RepositoryItem("m", "1", "READY", "why"),
    TABLE,
    m.ClientReply(7, 200, entry=ENTRY, table=TABLE, index=[m.RepositoryItem("m", "1", "READY")]),
    m.ClientReply(8, 404, "not found", "model_not_found"),
]


def test_samples_cover_every_struct() -> None:
    declared = {
        cls
        for _, cls in inspect.getmembers(m, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__module__ == m.__name__
    }
    assert declared == {type(s) for s in SAMPLES}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip_without_pickle(sample: Any) -> None:
    data = m.encode(sample)
    assert isinstance(data, bytes)
    # No pickle: no PROTO opcode at the start, no protocol 4/5 header anywhere.
    assert not data.startswith(b"\x80")
    assert b"\x80\x04" not in data and b"\x80\x05" not in data
    decoded = msgspec.msgpack.decode(data, type=type(sample))
    assert decoded == sample
    # And via the generic decoder the structure is plain msgpack (arrays/maps of scalars).
    assert isinstance(msgspec.msgpack.decode(data), list | dict)


def test_tagged_structs_are_arrays_led_by_their_tag() -> None:
    raw = msgspec.msgpack.decode(m.encode(m.ClientGet(5)))
    assert raw == ["c_get", 5]
    raw = msgspec.msgpack.decode(m.encode(m.InferReply(9, m.Status.DEADLINE, "late")))
    assert raw[:4] == ["reply", 9, m.Status.DEADLINE, "late"]


def _all_decode(decoder: m.Decoder[Any], samples: list[Any]) -> None:
    for sample in samples:
        assert decoder.decode(m.encode(sample)) == sample


def test_socket_decoders_accept_their_unions() -> None:
    by_type: dict[type, list[Any]] = {}
    for s in SAMPLES:
        by_type.setdefault(type(s), []).append(s)
    infer_requests = by_type[m.InferRequest]
    _all_decode(m.infer_request_decoder, infer_requests)
    _all_decode(m.infer_reply_decoder, by_type[m.InferReply])
    inbound = [
        s
        for t in (m.WorkerHello, m.Heartbeat, m.ModelLoaded, m.ModelUnloaded, m.WorkerGoodbye)
        for s in by_type[t]
    ] + [
        s
        for t in (
            m.ClientLoad,
            m.ClientUnload,
            m.ClientEnsure,
            m.ClientGet,
            m.ClientIndex,
            m.ClientShmRegister,
            m.ClientShmUnregister,
        )
        for s in by_type[t]
    ]
    _all_decode(m.coordinator_inbound_decoder, inbound)
    _all_decode(m.worker_inbound_decoder, by_type[m.LoadModel] + by_type[m.UnloadModel])
    _all_decode(m.client_inbound_decoder, by_type[m.ClientReply] + [TABLE])
    _all_decode(m.table_decoder, [TABLE])


@pytest.mark.parametrize(
    ("decoder", "wrong"),
    [
        (m.infer_request_decoder, m.InferReply(1, 0)),
        (m.infer_reply_decoder, REF),
        (m.coordinator_inbound_decoder, m.LoadModel("m", "1", "/p", CONFIG, SCHEMA)),
        (m.worker_inbound_decoder, m.ClientGet(1)),
        (m.client_inbound_decoder, m.WorkerGoodbye(0, 1, "x")),
        (m.table_decoder, m.ClientReply(1, 200)),
    ],
)
def test_decoder_rejects_other_messages(decoder: msgspec.msgpack.Decoder[Any], wrong: Any) -> None:
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(m.encode(wrong))


def test_decoders_reject_wrong_field_types() -> None:
    bad = msgspec.msgpack.encode(["reply", "not-an-int", 0])
    with pytest.raises(msgspec.ValidationError):
        m.infer_reply_decoder.decode(bad)
    missing = msgspec.msgpack.encode(["hello", 0, 1])
    with pytest.raises(msgspec.ValidationError):
        m.coordinator_inbound_decoder.decode(missing)
    unknown_tag = msgspec.msgpack.encode(["nope", 1])
    with pytest.raises(msgspec.ValidationError):
        m.coordinator_inbound_decoder.decode(unknown_tag)


DECODERS: list[m.Decoder[Any]] = [
    m.infer_request_decoder,
    m.infer_reply_decoder,
    m.coordinator_inbound_decoder,
    m.worker_inbound_decoder,
    m.client_inbound_decoder,
    m.table_decoder,
]


def test_garbage_raises_msgspec_errors() -> None:
    import pickle

    rng = random.Random(1234)
    # Random bytes that are not valid UTF-8 where a string is expected raise UnicodeDecodeError
    # (msgspec issue #714, see test_invalid_utf8_raises_a_msgspec_error); keep them apart here.
    garbage = (
        [
            b"",
            b"\xc1",  # never used in msgpack
            b"\x92",  # array header, no elements
            pickle.dumps(m.ClientGet(1), protocol=4),
            pickle.dumps({"a": 1}, protocol=5),
            m.encode(m.InferRequest(1, "t", "m", "1", [REF], [], "s", 0, 64, 1))[:-3],  # truncated
        ]
        + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(300)]
    )
    for decoder in DECODERS:
        for blob in garbage:
            with pytest.raises((msgspec.DecodeError, UnicodeDecodeError)):
                decoder.decode(blob)
    ascii_garbage = [bytes(rng.randrange(128) for _ in range(rng.randrange(1, 64))) for _ in range(300)]
    for decoder in DECODERS:
        for blob in ascii_garbage:
            with pytest.raises(msgspec.DecodeError):
                decoder.decode(blob)


def test_invalid_utf8_raises_a_msgspec_error() -> None:
    # A goodbye whose reason is not UTF-8: what a buggy or foreign peer could send the coordinator.
    blob = m.encode(m.WorkerGoodbye(0, 1, "REASON")).replace(b"REASON", b"\xff\xfe\xfd\xfc\xfb\xfa")
    with pytest.raises(msgspec.DecodeError):
        m.coordinator_inbound_decoder.decode(blob)


def test_status_values_are_distinct_ints() -> None:
    values = {k: v for k, v in vars(m.Status).items() if k.isupper()}
    assert len(set(values.values())) == len(values) == 7
    assert values["OK"] == 0
