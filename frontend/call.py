"""One inference, whatever protocol brought it.

A protocol module (``/v1``, ``/v2`` JSON or binary, gRPC) only decodes its request into
an ``InferenceCall`` and encodes the ``CallResult`` back; everything in between happens
here, once: the model, the checks against its schema and the server's bounds, shared
memory regions, the dispatch and the classification extension.

Ownership: the ``CallResult`` holds views of this process's arena; the caller
encodes its response from them and then releases it (``with result:``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ipc import datatypes
from ipc.messages import ModelEntry, ModelSchema, TensorRef, TensorSpec
from model_server.logs import model_var
from model_server.settings import Settings

from .classification import ClassificationError, top_k
from .coordinator_client import CoordinatorClient
from .dispatcher import BodyLease, CallInput, CallOutput, InferResult, RegionRef, ResultTensor
from .errors import ApiError
from .limits import check_inputs, check_rows, too_large
from .service import Service, Tracker
from .tensors import check_shape, from_raw_json, invalid


@dataclass(slots=True)
class InferenceCall:
    model: str
    version: str | None
    inputs: list[CallInput]
    outputs: list[CallOutput] = field(default_factory=list)  # empty: every output
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None  # the client's own deadline; may shorten the server's
    request_id: str = ""  # trace id for logs (X-Request-ID)
    id: str | None = None  # the protocol's request id, echoed in the response
    lease: BodyLease | None = None  # the arena slot a REST body was streamed into


@dataclass
class CallResult:
    """Outputs as views of shared memory, valid until ``release()`` (or the end of ``with``)."""

    model: str
    version: str
    id: str | None
    outputs: list[ResultTensor]
    _infer: InferResult

    def release(self) -> None:
        self.outputs = []
        self._infer.release()

    def __enter__(self) -> CallResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def bad(message: str, status: int = 400, code: str = "bad_request") -> ApiError:
    return ApiError(status, code, message)


# --- request parameters, read the same by the REST and gRPC V2 codecs ----------------------


def int_param(params: dict[str, Any], key: str, where: str, required: bool = False) -> int:
    value = params.get(key)
    if value is None:
        if required:
            raise bad(f"{where}: parameters.{key} is required")
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad(f"{where}: parameters.{key} must be a non-negative integer")
    return value


def region_param(params: dict[str, Any], where: str, shm_enabled: bool) -> RegionRef | None:
    """The client region the shared-memory parameters name, if any."""
    name = params.get("shared_memory_region")
    if name is None:
        return None
    if not shm_enabled:
        raise bad("system shared memory is disabled (MODEL_SERVER_ALLOW_CLIENT_SHM)", 501)
    if not isinstance(name, str) or not name:
        raise bad(f"{where}: parameters.shared_memory_region must be a non-empty string")
    size = int_param(params, "shared_memory_byte_size", where, required=True)
    return RegionRef(name, int_param(params, "shared_memory_offset", where), size)


def classification_param(params: dict[str, Any], where: str) -> int:
    """Top k classes asked for an output (0: the tensor itself)."""
    if "classification" not in params:
        return 0
    k = int_param(params, "classification", where)
    if k < 1:
        raise bad(f"{where}: parameters.classification must be at least 1")
    return k


def timeout_param(parameters: dict[str, Any]) -> float | None:
    """Triton's request parameter ``timeout`` (µs) in seconds; None when absent or 0."""
    timeout_us = parameters.get("timeout")
    if timeout_us is None:
        return None
    if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
        raise bad("parameters.timeout must be a non-negative integer (microseconds)")
    return timeout_us / 1e6 if timeout_us else None


# --- checks against the model --------------------------------------------------------------


def check_inputs_against(call: InferenceCall, schema: ModelSchema, settings: Settings) -> None:
    """Names, datatypes, shapes and sizes of the inputs, and the server's bounds on them."""
    check_inputs(settings, len(call.inputs), "inputs")
    specs = {s.name: s for s in schema.inputs}
    seen: set[str] = set()
    for tensor in call.inputs:
        if tensor.name in seen:
            raise bad(f"input '{tensor.name}' appears twice")
        seen.add(tensor.name)
        spec = _check_spec(tensor, specs.get(tensor.name))
        if tensor.shape and spec.shape and spec.shape[0] < 0:
            check_rows(settings, tensor.shape[0], f"input '{tensor.name}'")
        _check_size(tensor)
    missing = sorted(set(specs) - seen)
    if missing:
        raise invalid(f"missing input(s) {missing} for the model")
    region_bytes = sum(t.region.byte_size for t in call.inputs if t.region is not None)
    if region_bytes > settings.max_request_bytes:
        # A worker copies region inputs into its own memory: bounded like a body would be.
        raise too_large(
            f"shared-memory inputs of {region_bytes} bytes", "MAX_REQUEST_BYTES", settings.max_request_bytes
        )


def _check_spec(tensor: CallInput, spec: TensorSpec | None) -> TensorSpec:
    """The model's spec of ``tensor``, which its datatype and shape fit."""
    where = f"input '{tensor.name}'"
    if spec is None:
        raise invalid(f"unexpected inference input '{tensor.name}' for the model")
    if tensor.datatype not in datatypes.KNOWN:
        raise bad(f"{where}: unknown datatype {tensor.datatype!r}")
    if tensor.datatype not in datatypes.SUPPORTED:
        raise bad(f"{where}: datatype {tensor.datatype} is not supported", 501, "not_implemented")
    if tensor.datatype != spec.datatype:
        raise invalid(f"{where}: datatype {tensor.datatype} does not match the model's {spec.datatype}")
    if any(d < 0 for d in tensor.shape):
        raise bad(f"{where}: shape {tensor.shape} has a negative dimension")
    check_shape(spec, tensor.shape, where)
    return spec


def _check_size(tensor: CallInput) -> None:
    """Raw bytes and region sizes agree with the shape (BYTES: every element is complete)."""
    where = f"input '{tensor.name}'"
    want = None if tensor.datatype == "BYTES" else datatypes.nbytes_of(tensor.datatype, tensor.shape)
    if tensor.region is not None:
        if want is not None and tensor.region.byte_size != want:
            raise bad(
                f"{where}: shared_memory_byte_size {tensor.region.byte_size} does not match shape "
                f"{tensor.shape} of {tensor.datatype} ({want} bytes)"
            )
    elif tensor.raw is not None:
        if want is None:
            try:
                datatypes.deserialize_bytes(tensor.raw, math.prod(tensor.shape))
            except ValueError as exc:
                raise bad(f"{where}: {exc}") from None
        elif len(tensor.raw) != want:
            raise bad(
                f"{where}: {len(tensor.raw)} bytes of data do not match shape {tensor.shape} "
                f"of {tensor.datatype} ({want} bytes)"
            )
    elif tensor.array is None and tensor.json is None:
        raise bad(f"{where} has no data, binary_data_size or shared_memory_region")


def check_outputs_against(call: InferenceCall, schema: ModelSchema) -> None:
    known = {o.name for o in schema.outputs}
    for out in call.outputs:
        if out.name not in known:
            raise invalid(f"unexpected inference output '{out.name}' for the model")
        if out.classification and out.region is not None:
            raise bad(f"output '{out.name}': classification results are not written to shared memory")


# --- shared memory regions -----------------------------------------------------------------


async def resolve_region(coordinator: CoordinatorClient, ref: RegionRef, where: str) -> TensorRef:
    """A descriptor of ``ref`` in the registered region, or a 400 naming what is wrong."""
    coordinator.catch_up()  # a region unregistered through another frontend a moment ago
    region = coordinator.table.regions.get(ref.name)
    if region is None:
        # Registered through another frontend process a moment ago, and this process's
        # snapshot predates it: ask the coordinator (the owner of registrations) once.
        await coordinator.refresh()
        region = coordinator.table.regions.get(ref.name)
    if region is None:
        raise bad(f"{where}: shared memory region '{ref.name}' is not registered", code="bad_region")
    if ref.offset + ref.byte_size > region.byte_size:
        raise bad(
            f"{where}: offset {ref.offset} + size {ref.byte_size} exceeds shared memory region "
            f"'{ref.name}' of {region.byte_size} bytes",
            code="bad_region",
        )
    return TensorRef(where, "", [], region.key, region.offset + ref.offset, ref.byte_size)


async def _resolve_inputs(service: Service, call: InferenceCall) -> None:
    """Region inputs get their descriptors, JSON inputs their arrays: ready to dispatch."""
    for t in call.inputs:
        if t.region is not None:
            ref = await resolve_region(service.coordinator, t.region, f"input '{t.name}'")
            t.ref = msgspec.structs.replace(ref, name=t.name, datatype=t.datatype, shape=t.shape)
        elif t.json is not None:
            t.array = from_raw_json(t.json, t.datatype, t.shape, f"input '{t.name}'")


async def _client_outputs(service: Service, call: InferenceCall) -> list[TensorRef]:
    refs: list[TensorRef] = []
    for out in call.outputs:
        if out.region is not None:
            ref = await resolve_region(service.coordinator, out.region, f"output '{out.name}'")
            refs.append(msgspec.structs.replace(ref, name=out.name))
    return refs


# --- the call -------------------------------------------------------------------------------


async def execute(
    service: Service, call: InferenceCall, tracker: Tracker, entry: ModelEntry | None = None
) -> CallResult:
    """Run ``call``: the one inference path every protocol shares. ``entry``: the model's, when
    the codec already looked it up (REST does, so an unknown model answers before the body's errors)."""
    if entry is None:
        entry = await service.entry(call.model, call.version)
        tracker.model, tracker.version = entry.model_id, entry.version
    assert entry.schema is not None
    model_var.set(f"{entry.model_id}:{entry.version}")
    check_inputs_against(call, entry.schema, service.settings)
    check_outputs_against(call, entry.schema)
    await _resolve_inputs(service, call)
    client_outputs = await _client_outputs(service, call)
    names = [o.name for o in call.outputs]
    infer = await service.infer(
        entry, call.inputs, names, call.request_id, client_outputs, timeout_s=call.timeout_s, body=call.lease
    )
    tracker.result = infer
    try:
        for tensor in infer.outputs:
            _annotate(tensor, call)
    except BaseException:
        infer.release()
        raise
    return CallResult(entry.model_id, entry.version, call.id, infer.outputs, infer)


def _annotate(tensor: ResultTensor, call: InferenceCall) -> None:
    """What the client asked for this output, and its classes when it asked for them."""
    tensor.requested = requested = next((o for o in call.outputs if o.name == tensor.name), None)
    if requested is not None and requested.classification:
        try:
            classes = top_k(tensor.array(), requested.classification)
        except ClassificationError as exc:
            raise bad(f"output '{tensor.name}': {exc}") from None
        tensor.classes, tensor.datatype, tensor.shape = classes, "BYTES", list(classes.shape)
