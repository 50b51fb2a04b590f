"""Every message that crosses a process boundary, as msgspec Structs.

Wire layout
-----------
Each ZeroMQ message is the routing envelope that the socket type adds
(ROUTER sockets prepend the peer's routing id) followed by **one** payload
frame: a msgpack array whose first element is the message's tag::

    ROUTER side:  [peer routing id][ ["infer", seq, trace_id, ...] ]
    DEALER side:                   [ ["infer", seq, trace_id, ...] ]

Structs are ``array_like`` (positional, no field names on the wire) and
``tag``-ged, so one decoder per socket decodes the union of messages that
socket can receive. Tensors never travel here: a :class:`TensorRef` names a
shared-memory segment, an offset and a length (see ``ipc.arena``); the bytes
stay in shared memory. Nothing is pickled.

Sockets (all ``ipc://`` endpoints under the run directory, see ``ipc.endpoints``):

=====================  ========  ==============================================
endpoint               binder    peers / messages
=====================  ========  ==============================================
``coordinator.ipc``    ROUTER    workers (DEALER): hello, heartbeat, loaded,
                                 unloaded, goodbye; coordinator -> worker:
                                 load, unload. Frontends (DEALER): client
                                 requests -> ``ClientReply``.
``events.ipc``         PUB       frontends (SUB): ``TableSnapshot`` on every
                                 change and once per heartbeat interval.
``worker-<i>.ipc``     ROUTER    frontends (ROUTER, routing id ``f<pid>``):
                                 ``InferRequest`` -> ``InferReply``.
=====================  ========  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import msgspec

# ----------------------------------------------------------------------------
# Shared shapes
# ----------------------------------------------------------------------------


class TensorRef(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A tensor living in shared memory: where it is and how to read it."""

    name: str
    datatype: str  # OIP name (ipc.datatypes)
    shape: list[int]
    segment: str  # /dev/shm object name
    offset: int
    nbytes: int


class TensorSpec(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A model input or output: -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelSchema(msgspec.Struct, gc=False, omit_defaults=True):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Column order of a single [N, F] input, from ONNX metadata_props or an MLflow signature.
    feature_names: list[str] | None = None
    # Per-feature datatype when known from an MLflow signature (name -> OIP datatype).
    feature_types: dict[str, str] | None = None
    # True when every input and output has a variable leading (batch) dimension.
    batched: bool = False
    metadata: dict[str, str] = {}


class BatchConfig(msgspec.Struct, gc=False, omit_defaults=True):
    """Dynamic batching of one model (0 / empty: use the server default)."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = []
    max_queue_size: int = 0


class ModelConfig(msgspec.Struct, gc=False, omit_defaults=True):
    batching: BatchConfig = msgspec.field(default_factory=BatchConfig)
    replicas: int = 0  # 0: the server default (MODEL_SERVER_MODEL_REPLICAS)
    warmup: bool = True
    startup: bool = False  # listed in the models file: /ready waits for it


ModelState = Literal["downloading", "loading", "ready", "failed", "unloading"]


class ModelEntry(msgspec.Struct, gc=False, omit_defaults=True):
    """The coordinator's row for one (model_id, version)."""

    model_id: str
    version: str
    state: ModelState
    registry_uri: str = ""
    reason: str = ""
    # HTTP status that fits the failure (404 not found, 422 not ONNX, 502 source down...).
    error_status: int = 0
    path: str = ""
    sha256: str = ""
    size_bytes: int = 0
    schema: ModelSchema | None = None
    workers: list[int] = []  # indices of workers holding a ready session
    loaded_at: float = 0.0  # unix time the model became ready
    load_ms: float = 0.0
    memory_bytes: int = 0  # largest resident size a worker reported for it
    warmup_ms: float = 0.0  # warm-up inference time on the first worker that loaded it
    config: ModelConfig = msgspec.field(default_factory=ModelConfig)
    progress: dict[str, float] = {}  # download progress: bytes, total, percent, rate


class WorkerState(msgspec.Struct, gc=False, omit_defaults=True):
    index: int
    pid: int
    endpoint: str
    device: str
    alive: bool
    inflight: int = 0
    models: list[list[str]] = []  # [model_id, version] pairs with a ready session
    rss_bytes: int = 0
    started_at: float = 0.0
    restarts: int = 0


# ----------------------------------------------------------------------------
# Frontend <-> worker (inference)
# ----------------------------------------------------------------------------


class InferRequest(msgspec.Struct, tag="infer", array_like=True, gc=False):
    seq: int  # unique per frontend process: matches the reply to its waiter
    trace_id: str  # X-Request-ID, for the worker's log lines
    model_id: str
    version: str
    inputs: list[TensorRef]
    output_names: list[str]  # empty: every output of the model
    out_segment: str  # output slot in the frontend's arena
    out_offset: int
    out_capacity: int
    deadline_ns: int  # time.monotonic_ns() after which the worker must not start it
    # Outputs the client wants written into its own registered regions (V2 shm).
    client_outputs: list[TensorRef] = []


class InferReply(msgspec.Struct, tag="reply", array_like=True, gc=False):
    seq: int
    status: int  # ipc.messages.Status
    error: str = ""
    outputs: list[TensorRef] = []
    spill: str = ""  # segment the frontend must unlink after reading ("" when unused)
    queue_us: int = 0
    compute_us: int = 0
    batch_rows: int = 0


class Status:
    """InferReply.status values (integers on the wire)."""

    OK = 0
    BAD_INPUT = 1  # 400/422: input does not match the model
    NOT_LOADED = 2  # worker holds no session for the model (evicted/unloading)
    DEADLINE = 3  # deadline passed before the worker started
    QUEUE_FULL = 4  # model's batching queue is full
    INTERNAL = 5  # onnxruntime failed
    OUTPUT_REGION = 6  # a client output region is too small / missing


# ----------------------------------------------------------------------------
# Worker <-> coordinator (control)
# ----------------------------------------------------------------------------


class WorkerHello(msgspec.Struct, tag="hello", array_like=True, gc=False):
    index: int
    pid: int
    endpoint: str
    device: str
    max_models: int
    max_bytes: int


class Heartbeat(msgspec.Struct, tag="hb", array_like=True, gc=False):
    """Also a registration: a restarted coordinator learns its workers from these."""

    index: int
    pid: int
    endpoint: str
    device: str
    inflight: int
    rss_bytes: int
    models: list[list[str]]  # [model_id, version] held


class ModelLoaded(msgspec.Struct, tag="loaded", array_like=True, gc=False):
    index: int
    model_id: str
    version: str
    ok: bool
    error: str = ""
    error_status: int = 0
    memory_bytes: int = 0
    load_ms: float = 0.0
    warmup_ms: float = 0.0  # 0: not warmed
    evicted: list[list[str]] = []  # sessions dropped to make room


class ModelUnloaded(msgspec.Struct, tag="unloaded", array_like=True, gc=False):
    index: int
    model_id: str
    version: str
    reason: str  # "unload" | "evicted"


class WorkerGoodbye(msgspec.Struct, tag="bye", array_like=True, gc=False):
    index: int
    pid: int
    reason: str


class LoadModel(msgspec.Struct, tag="load", array_like=True, gc=False):
    model_id: str
    version: str
    path: str
    config: ModelConfig
    schema: ModelSchema


class UnloadModel(msgspec.Struct, tag="unload", array_like=True, gc=False):
    model_id: str
    version: str


WorkerToCoordinator = WorkerHello | Heartbeat | ModelLoaded | ModelUnloaded | WorkerGoodbye
CoordinatorToWorker = LoadModel | UnloadModel


# ----------------------------------------------------------------------------
# Frontend <-> coordinator (management)
# ----------------------------------------------------------------------------


class ClientLoad(msgspec.Struct, tag="c_load", array_like=True, gc=False):
    req: int
    model_id: str
    version: str
    registry_uri: str | None
    config: ModelConfig


class ClientUnload(msgspec.Struct, tag="c_unload", array_like=True, gc=False):
    req: int
    model_id: str
    version: str


class ClientEnsure(msgspec.Struct, tag="c_ensure", array_like=True, gc=False):
    """A model evicted from every worker is wanted again: place it on one."""

    req: int
    model_id: str
    version: str


class ClientLookup(msgspec.Struct, tag="c_lookup", array_like=True, gc=False):
    """One model's entry (``version`` empty: the newest ready version, else any).

    Answered 404 without the table when the model is unknown, so a stream of requests for
    names that do not exist costs a dictionary lookup, not a snapshot of the whole table;
    the table comes along only when the model is ready (the asking frontend is about to
    route to it and its copy may predate the load).
    """

    req: int
    model_id: str
    version: str


class ClientGet(msgspec.Struct, tag="c_get", array_like=True, gc=False):
    """Ask for the current table (also the readiness probe's round trip)."""

    req: int


class ClientIndex(msgspec.Struct, tag="c_index", array_like=True, gc=False):
    """Models available in the repository, loaded or not (V2 repository index)."""

    req: int


class ShmRegion(msgspec.Struct, gc=False, frozen=True):
    """A client's system shared-memory region (V2 extension), registered server-wide."""

    name: str
    key: str  # /dev/shm object name, without the leading '/'
    offset: int
    byte_size: int


class ClientShmRegister(msgspec.Struct, tag="c_shm_reg", array_like=True, gc=False):
    req: int
    region: ShmRegion


class ClientShmUnregister(msgspec.Struct, tag="c_shm_unreg", array_like=True, gc=False):
    req: int
    name: str  # "" unregisters every region


class RepositoryItem(msgspec.Struct, gc=False, omit_defaults=True):
    name: str
    version: str
    state: str
    reason: str = ""


ClientRequest = (
    ClientLoad
    | ClientLookup
    | ClientUnload
    | ClientEnsure
    | ClientGet
    | ClientIndex
    | ClientShmRegister
    | ClientShmUnregister
)


class TableSnapshot(msgspec.Struct, tag="table", array_like=True, gc=False):
    epoch: int
    ready: bool
    reasons: list[str]
    models: list[ModelEntry]
    workers: list[WorkerState]
    sent_at: float = 0.0
    regions: list[ShmRegion] = []
    evictions: int = 0  # LRU evictions reported by workers since the coordinator started


class ClientReply(msgspec.Struct, tag="c_reply", array_like=True, gc=False):
    req: int
    status: int  # HTTP status the frontend answers with
    error: str = ""
    code: str = ""
    entry: ModelEntry | None = None
    table: TableSnapshot | None = None
    index: list[RepositoryItem] = []


CoordinatorInbound = WorkerToCoordinator | ClientRequest
CoordinatorToClient = ClientReply | TableSnapshot


# ----------------------------------------------------------------------------
# Codecs: one encoder per process, one decoder per receiving socket.
# ----------------------------------------------------------------------------

encoder = msgspec.msgpack.Encoder()
# The encoder's own method, not a wrapper: one Python frame less on every request sent.
encode: Callable[[Any], bytes] = encoder.encode


T = TypeVar("T")


class Decoder(Generic[T]):
    """A msgpack decoder whose every failure is ``msgspec.DecodeError``.

    msgspec raises UnicodeDecodeError for strings that are not UTF-8 (msgspec
    #714); one such message from a faulty peer must not crash a process that
    only expects DecodeError.
    """

    def __init__(self, kind: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(kind)

    def decode(self, payload: bytes) -> T:
        try:
            return self._decoder.decode(payload)
        except UnicodeDecodeError as exc:
            raise msgspec.DecodeError(f"invalid UTF-8 in a message string: {exc}") from None


infer_request_decoder: Decoder[InferRequest] = Decoder(InferRequest)
infer_reply_decoder: Decoder[InferReply] = Decoder(InferReply)
coordinator_inbound_decoder: Decoder[CoordinatorInbound] = Decoder(CoordinatorInbound)
worker_inbound_decoder: Decoder[CoordinatorToWorker] = Decoder(CoordinatorToWorker)
client_inbound_decoder: Decoder[CoordinatorToClient] = Decoder(CoordinatorToClient)
table_decoder: Decoder[TableSnapshot] = Decoder(TableSnapshot)
