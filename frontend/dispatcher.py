"""From tensors to a worker and back: the frontend's half of the shared-memory protocol.

For each inference the dispatcher

1. allocates one slot of this process's arena holding the inputs and room for
   the outputs (sized from the schema; the worker spills if they do not fit),
2. writes the inputs into it (the only copy on the way in),
3. sends an ``InferRequest`` of descriptors to the least-busy worker that holds
   the model, over one ROUTER socket connected to every worker,
4. awaits the ``InferReply`` without blocking the event loop, and
5. hands the caller views of the outputs; the slot is freed when the caller is done.

Ownership of the slot (see ``ipc.arena``): while a request is in flight the
worker owns it. If the caller gives up (deadline, client gone) the slot stays
quarantined and is freed when the reply arrives or the worker is known dead,
never earlier. A ZeroMQ socket monitor reports a worker's disconnection at
once, and every request in flight on it fails with 503 right away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ipc import datatypes, endpoints
from ipc.arena import ALIGNMENT, Arena, ArenaFull, Segment, SegmentError, Slot, TooLarge
from ipc.messages import (
    InferReply,
    InferRequest,
    ModelEntry,
    ModelSchema,
    Status,
    TensorRef,
    encode,
    infer_reply_decoder,
)

from .coordinator_client import Table
from .errors import ApiError
from .routing import batch_fill, order_workers

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
# How long a request waits for a worker connection that is (re)establishing, and how often it looks.
RECONNECT_WAIT_S = 1.0
RECONNECT_POLL_S = 0.01
# Room given to an output whose size the schema cannot tell (dynamic non-batch dims, strings).
UNKNOWN_OUTPUT_BYTES = 64 * 1024


# Plain ints, not pyzmq's enums: an enum's `&` costs more than the getsockopt it tests.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SEND_ID = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_LAST = int(zmq.NOBLOCK)


@functools.cache
def _routing_id(worker: int) -> bytes:
    return endpoints.worker_routing_id(worker)


@dataclass(slots=True)
class RegionRef:
    """A place in a client's registered shared-memory region (system shared memory extension)."""

    name: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class CallInput:
    """One input tensor. Exactly one of ``array``, ``raw``, ``json`` and ``region`` is set.

    ``json`` is the text of a REST ``data`` value, converted into ``array`` only after the
    checks pass. ``raw`` is the tensor's little-endian bytes (BYTES: each element a 4-byte
    little-endian length then its bytes), as the binary extension and gRPC's
    ``raw_input_contents`` carry it; ``arena_offset`` says it already lies in this
    process's arena (a body streamed into a ``BodyLease``). A ``region`` is sent as
    ``ref``, its descriptor once resolved.
    """

    name: str
    datatype: str
    shape: list[int]
    array: Array | None = None
    raw: bytes | memoryview | None = None
    arena_offset: int | None = None
    region: RegionRef | None = None
    json: msgspec.Raw | None = None
    ref: TensorRef | None = None

    def nbytes(self) -> int:
        if self.arena_offset is not None:
            return 0  # takes no room in the request's slot: it is in the body slot
        if self.raw is not None:
            return len(self.raw)
        if self.array is not None:
            if self.datatype == "BYTES":
                self.raw = datatypes.serialize_bytes(self.array)
                return len(self.raw)
            return int(self.array.nbytes)
        return 0


@dataclass(slots=True)
class CallOutput:
    """One output the client asked for, and how it wants it."""

    name: str
    binary: bool | None = None  # REST binary extension; None: the request's default
    classification: int = 0  # top k classes instead of the tensor
    region: RegionRef | None = None  # written into the client's region instead of returned


@dataclass(slots=True)
class ResultTensor:
    name: str
    datatype: str
    shape: list[int]
    data: memoryview | None  # None when written into the client's region
    nbytes: int
    requested: CallOutput | None = None  # what the client asked for this output (None: not named)
    classes: Array | None = None  # classification: BYTES "value:index", already computed

    def array(self) -> Array:
        """A numpy view (BYTES: an object array of bytes). Valid until the result is released."""
        if self.classes is not None:
            return self.classes
        assert self.data is not None
        if self.datatype == "BYTES":
            return datatypes.deserialize_bytes(self.data, math.prod(self.shape)).reshape(self.shape)
        return np.frombuffer(self.data, dtype=datatypes.numpy_dtype(self.datatype)).reshape(self.shape)


@dataclass
class InferResult:
    """Outputs as views of shared memory; ``release()`` (or leaving ``with``) frees them."""

    outputs: list[ResultTensor]
    worker: int
    queue_us: int
    compute_us: int
    batch_rows: int
    _release: tuple[Arena, list[Slot], Segment | None] | None = None

    def release(self) -> None:
        if self._release is None:
            return
        arena, slots, spill = self._release
        self._release = None
        self.outputs = []
        for slot in slots:
            arena.free(slot)
        _discard(spill)

    def __enter__(self) -> InferResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class BodyLease:
    """A slot an HTTP body was streamed into (binary tensors in place, no copy).

    The request handler owns it until the dispatcher sends a request that reads
    from it; from then on it follows that request's slot (see ``ipc.arena``).
    Whoever owns it at the end frees it: ``owned`` says whether that is still the handler.
    """

    slot: Slot
    base: int  # arena offset of the body's first byte
    size: int
    owned: bool = True


@dataclass(slots=True)
class _Pending:
    """A request the worker holds: its waiter, the slots to free when it is done, its deadline."""

    future: asyncio.Future[InferReply]
    worker: int
    slots: list[Slot]
    deadline: float  # event-loop time


@dataclass(slots=True)
class _Outgoing:
    """A request waiting for the end of the loop iteration to be sent."""

    workers: list[int]
    payload: bytes
    seq: int
    pending: _Pending
    body: BodyLease | None
    sent: asyncio.Future[int]  # the worker it went to, or the ApiError


def _discard(spill: Segment | None) -> None:
    """A worker's spill segment of outputs, ours once its reply is read: gone with the request."""
    if spill is not None:
        spill.unlink()
        spill.close()


def _shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "frontend is shutting down")


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def estimate_output_bytes(schema: ModelSchema | None, rows: int, names: list[str], input_bytes: int) -> int:
    """Room for the outputs: exact when the schema fixes every dimension but the batch."""
    if schema is None:
        return max(UNKNOWN_OUTPUT_BYTES, input_bytes)
    wanted = [o for o in schema.outputs if not names or o.name in names]
    total = 0
    for spec in wanted:
        dims = list(spec.shape)
        if dims and dims[0] == -1:
            dims[0] = max(rows, 1)
        sized = spec.datatype != "BYTES" and spec.datatype in datatypes.OIP_TO_NUMPY
        if sized and all(d >= 0 for d in dims):
            total += _align(datatypes.nbytes_of(spec.datatype, dims))
        else:
            total += max(UNKNOWN_OUTPUT_BYTES, input_bytes)
    return max(total, ALIGNMENT)


class Dispatcher:
    def __init__(
        self, ctx: zmq.asyncio.Context, run_dir: Any, shm_prefix: str, arena_bytes: int, workers: int
    ) -> None:
        self.ctx = ctx
        self.run_dir = run_dir
        self.arena = Arena(shm_prefix, arena_bytes)
        self.sock: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.endpoints: dict[str, int] = {}
        self.connected: dict[int, bool] = {}
        # Worker index -> pid of the live process the coordinator reports, and the pid that was
        # live when our connection to that index last dropped: a worker is worth waiting for
        # only when the coordinator reports a process we have not already lost.
        self.live_pids: dict[int, int] = {}
        self.lost_pids: dict[int, int] = {}
        self.inflight: dict[int, _Pending] = {}
        self.per_worker: defaultdict[int, set[int]] = defaultdict(set)
        self._seq = itertools.count(1)
        self._rr = itertools.count()
        self._fds: list[int] = []
        self._initial_workers = workers
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._outbox: list[_Outgoing] = []
        self._sweep_at = math.inf  # when the deadline timer fires (inf: not armed)
        self.stats = {"requests": 0, "worker_deaths": 0, "quarantined": 0}

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        # A plain (not asyncio) socket on the same ZeroMQ context, read from the event loop
        # through its FD: sends skip zmq.asyncio's future machinery on the request path.
        self.loop = asyncio.get_running_loop()
        sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self.ctx.underlying)
        sock = endpoints.configure(sync_ctx.socket(zmq.ROUTER), linger_ms=0)
        sock.setsockopt(zmq.ROUTING_ID, f"f{os.getpid()}-{secrets.token_hex(2)}".encode())
        # Unknown or gone worker -> EHOSTUNREACH at send time, instead of a silent drop.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reuses its routing id; the new connection takes it over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # No pipe (so no queueing) towards a worker whose connection is not up: a send to
        # a dead worker fails with EHOSTUNREACH instead of waiting for its restart.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock = sock
        # Handshake done, not just connected: only then does the ROUTER know the worker's routing id.
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        for index in range(self._initial_workers):
            self._connect(index, endpoints.worker_endpoint(self.run_dir, index))
        # ZeroMQ's FD is edge-triggered: each wake-up drains everything queued.
        self._fds = [int(sock.getsockopt(zmq.FD)), int(self.monitor.getsockopt(zmq.FD))]
        self.loop.add_reader(self._fds[0], self._drain_replies)
        self.loop.add_reader(self._fds[1], self._drain_monitor)
        # The FD only signals after a read has found the socket empty: read once now.
        self._drain_replies()
        self._drain_monitor()

    async def close(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for fd in self._fds:
            self.loop.remove_reader(fd)
        for pending in list(self.inflight.values()):
            if not pending.future.done():
                pending.future.set_exception(_shutting_down())
        if self.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.sock.close(linger=0)
        if self.monitor is not None:
            self.monitor.close(linger=0)
        self.arena.close()

    def _connect(self, index: int, endpoint: str) -> None:
        if endpoint in self.endpoints:
            return
        assert self.sock is not None
        self.endpoints[endpoint] = index
        self.sock.connect(endpoint)

    def on_table(self, table: Table) -> None:
        for worker in table.workers.values():
            self._connect(worker.index, worker.endpoint)
        self.live_pids = {w.index: w.pid for w in table.workers.values() if w.alive}

    # --- socket readers ---------------------------------------------------------------
    def _drain_replies(self) -> None:
        sock = self.sock
        assert sock is not None
        # Checking EVENTS (not catching zmq.Again) also re-arms the edge-triggered FD.
        while int(sock.getsockopt(_EVENTS)) & _POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) != 2:
                log.error("dropped a worker message with %d frames", len(frames))
                continue
            try:
                reply = infer_reply_decoder.decode(frames[1])
            except Exception as exc:
                log.error("undecodable worker reply: %s", exc)
                continue
            pending = self.inflight.pop(reply.seq, None)
            if pending is None:
                self._drop_spill(reply.spill)
                continue
            self.per_worker[pending.worker].discard(reply.seq)
            if pending.future.done():
                self._end_quarantine(pending)  # the caller gave up; the worker is done with the slots
                self._drop_spill(reply.spill)
            else:
                pending.future.set_result(reply)

    def _drain_monitor(self) -> None:
        assert self.monitor is not None
        while int(self.monitor.getsockopt(_EVENTS)) & _POLLIN:
            event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            index = self.endpoints.get(event["endpoint"].decode())
            if index is None:
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected[index] = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected[index] = False
                if index in self.live_pids:
                    self.lost_pids[index] = self.live_pids[index]
                self._fail_worker(index)

    def _fail_worker(self, index: int) -> None:
        seqs = self.per_worker.pop(index, set())
        if seqs:
            self.stats["worker_deaths"] += 1
            log.error("worker %d disconnected with %d request(s) in flight: failing them", index, len(seqs))
        for seq in seqs:
            pending = self.inflight.pop(seq)  # a request leaves both maps together
            if pending.future.done():
                self._end_quarantine(pending)  # the dead worker will never write again
            else:
                pending.future.set_exception(
                    ApiError(503, "worker_died", f"worker {index} exited while serving the request")
                )

    def _end_quarantine(self, pending: _Pending) -> None:
        self._free(pending.slots)
        self.stats["quarantined"] -= 1

    def _free(self, slots: list[Slot]) -> None:
        for slot in slots:
            self.arena.free(slot)

    def reserve(self, nbytes: int) -> Slot:
        """A slot for a request body to be streamed into (``BodyLease``)."""
        try:
            return self.arena.alloc(nbytes)
        except TooLarge as exc:
            raise ApiError(413, "payload_too_large", f"{exc} (MODEL_SERVER_SHM_ARENA_BYTES)") from None
        except ArenaFull as exc:
            raise ApiError(503, "arena_full", f"shared memory is busy: {exc}", retry_after=1) from None

    @staticmethod
    def _drop_spill(name: str) -> None:
        if name:
            with contextlib.suppress(SegmentError):
                Segment.attach(name).unlink()

    # --- routing ------------------------------------------------------------------------
    def candidates(self, entry: ModelEntry) -> list[int]:
        """Workers holding the model in the order to try them (``frontend.routing``)."""
        if len(entry.workers) <= 1:
            return list(entry.workers)
        per_worker = self.per_worker
        return order_workers(
            entry.workers,
            lambda w: self.connected.get(w, True),
            lambda w: len(per_worker.get(w, ())),
            next(self._rr),
            batch_fill(entry),
        )

    # --- the request path ----------------------------------------------------------
    # Who frees a request's slots, phase by phase: until the send succeeds, ``infer`` (on any
    # error); from the send until the reply, the worker (the reply and death handlers free them,
    # and a caller that gives up leaves them quarantined); after the reply, ``_result`` on an
    # error, else the returned ``InferResult`` on release.
    async def infer(
        self,
        entry: ModelEntry,
        inputs: list[CallInput],
        output_names: list[str],
        trace_id: str,
        timeout_s: float,
        client_outputs: list[TensorRef] | None = None,
        body: BodyLease | None = None,
    ) -> InferResult:
        """Run one inference. Use the result as a context manager: its views die on exit.

        Inputs with an ``arena_offset`` are read in place from ``body``, whose slot this
        request takes over once it is sent.
        """
        assert self.sock is not None
        workers = self.candidates(entry)
        if not workers:
            raise ApiError(
                503,
                "no_worker",
                f"no worker is serving {entry.model_id}:{entry.version} right now",
                retry_after=1,
            )
        sizes = [_align(t.nbytes()) for t in inputs]
        input_bytes = sum(sizes)
        rows = inputs[0].shape[0] if inputs and inputs[0].shape else 1
        slot = self.reserve(
            input_bytes + estimate_output_bytes(entry.schema, rows, output_names, input_bytes)
        )
        pending = _Pending(self.loop.create_future(), -1, [slot], self.loop.time() + timeout_s)
        try:
            seq = next(self._seq)
            request = InferRequest(
                seq,
                trace_id,
                entry.model_id,
                entry.version,
                self._write_inputs(slot, inputs, sizes),
                output_names,
                self.arena.name,
                slot.offset + input_bytes,
                slot.size - input_bytes,
                time.monotonic_ns() + int(timeout_s * 1e9),
                client_outputs or [],
            )
            outgoing = _Outgoing(workers, encode(request), seq, pending, body, self.loop.create_future())
            worker = await self._send_within(outgoing, timeout_s)
        except BaseException:
            self._abandon(pending)
            raise
        return self._result(await self._await_reply(pending, timeout_s), entry, worker, pending.slots)

    def _abandon(self, pending: _Pending) -> None:
        """The caller leaves before awaiting the reply: free the slots, or quarantine them if sent."""
        if pending.worker < 0:
            self._free(pending.slots)  # never sent
        elif pending.future.done() and not pending.future.cancelled():
            # Answered (or the worker died) before the caller resumed: the slots are ours.
            if pending.future.exception() is None:
                self._drop_spill(pending.future.result().spill)
            self._free(pending.slots)
        else:
            pending.future.cancel()  # the reply or death handler frees them
            self.stats["quarantined"] += 1

    async def _await_reply(self, pending: _Pending, timeout_s: float) -> InferReply:
        """Wait for the worker that owns the slots now; they are ours again only if it died."""
        try:
            return await pending.future
        except TimeoutError:
            self.stats["quarantined"] += 1
            raise ApiError(
                504, "deadline_exceeded", f"no answer within {timeout_s:g} s (MODEL_SERVER_REQUEST_TIMEOUT_S)"
            ) from None
        except asyncio.CancelledError:
            # Client went away: the reply handler frees the slot when the worker is done.
            self.stats["quarantined"] += 1
            raise
        except ApiError:
            self._free(pending.slots)  # the worker died: the slots are ours again
            raise

    # One timer for every deadline rather than one per request: it fires at the earliest
    # deadline of the requests in flight, expires what is due and re-arms for the next one.
    # Requests mostly share one timeout, so it is re-armed about once per timeout, not per request.
    def _arm_sweep(self, when: float) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_at = when
        self._sweep_timer = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        self._sweep_at = math.inf
        # The loop's clock and timers have millisecond resolution: what is due within it is due now.
        now = self.loop.time() + 0.001
        earliest = math.inf
        for pending in self.inflight.values():
            if pending.future.done():
                continue  # answered, or already given up (quarantined until the reply)
            if pending.deadline <= now:
                pending.future.set_exception(TimeoutError())
            elif pending.deadline < earliest:
                earliest = pending.deadline
        if earliest < math.inf:
            self._arm_sweep(earliest)

    def _result(self, reply: InferReply, entry: ModelEntry, worker: int, slots: list[Slot]) -> InferResult:
        """The reply as views of shared memory, owning ``slots`` (and a spill) until released."""
        spill: Segment | None = None
        try:
            if reply.spill:
                spill = Segment.attach(reply.spill)  # ours from now on; unlinked on release
            if reply.status != Status.OK:
                raise _reply_error(reply, entry)
            return InferResult(
                self._read_outputs(reply, spill),
                worker,
                reply.queue_us,
                reply.compute_us,
                reply.batch_rows,
                (self.arena, slots, spill),
            )
        except BaseException:
            self._free(slots)
            _discard(spill)
            raise

    async def _send_within(self, outgoing: _Outgoing, timeout_s: float) -> int:
        """Send, waiting briefly for a connection that is still being made.

        The coordinator can list a worker (restarted, or just joined) before this
        process's connection to it is up; ZeroMQ reconnects every 100 ms. When no
        holder takes the message but one of them is such a worker, the request waits
        for it, up to RECONNECT_WAIT_S and never past its own deadline. A worker whose
        process we already lost is not waited for: that fails at once.
        """
        deadline = time.monotonic() + min(timeout_s, RECONNECT_WAIT_S)
        while True:
            try:
                return await self._queue(outgoing)
            except ApiError:
                coming = any(self._reconnecting(w) for w in outgoing.workers)
                if not coming or time.monotonic() + RECONNECT_POLL_S > deadline:
                    raise
            await asyncio.sleep(RECONNECT_POLL_S)

    def _reconnecting(self, worker: int) -> bool:
        """Not connected, but the coordinator reports a live process for it that we have not lost."""
        live = self.live_pids.get(worker)
        return not self.connected.get(worker) and live is not None and self.lost_pids.get(worker) != live

    # Sends are queued and made together at the end of the loop iteration: ZeroMQ wakes its
    # I/O thread once for a burst of messages instead of once per message. A request is
    # registered in flight at the moment it is sent, so no reply can arrive before its waiter.
    def _queue(self, outgoing: _Outgoing) -> asyncio.Future[int]:
        if outgoing.sent.done():
            outgoing.sent = self.loop.create_future()  # a retry after a failed attempt
        if not self._outbox:
            self.loop.call_soon(self._flush_outbox)
        self._outbox.append(outgoing)
        return outgoing.sent

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.sock is None or self.sock.closed:
            for outgoing in outbox:
                if not outgoing.sent.done():
                    outgoing.sent.set_exception(_shutting_down())
            return
        for outgoing in outbox:
            if outgoing.sent.done():
                continue  # its caller left before the send
            try:
                worker = self._send(outgoing.workers, outgoing.payload)
            except Exception as exc:
                outgoing.sent.set_exception(exc)
                continue
            self._register(outgoing, worker)
            outgoing.sent.set_result(worker)
        # A send can consume the FD's edge for a reply that is already queued: look now.
        self._drain_replies()

    def _register(self, outgoing: _Outgoing, worker: int) -> None:
        """The request is sent: from now until the reply (or its death) the worker owns the slots."""
        pending = outgoing.pending
        pending.worker = worker
        body = outgoing.body
        if body is not None and body.owned:
            body.owned = False
            pending.slots.append(body.slot)
        self.inflight[outgoing.seq] = pending
        self.per_worker[worker].add(outgoing.seq)
        self.stats["requests"] += 1
        if pending.deadline < self._sweep_at:
            self._arm_sweep(pending.deadline)

    def _send(self, workers: list[int], payload: bytes) -> int:
        sock = self.sock
        assert sock is not None
        for worker in workers:
            try:
                # Two plain sends, not send_multipart: its per-call checks cost more than the send.
                # ROUTER_MANDATORY fails on the routing-id frame, before anything is queued.
                sock.send(_routing_id(worker), _SEND_ID)
                sock.send(payload, _SEND_LAST)
                return worker
            except zmq.ZMQError as exc:
                # Its queue is full (EAGAIN) or it is not connected (yet, or any more): try the next one.
                if exc.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                    raise
        raise ApiError(
            503, "no_worker", "every worker holding the model is unreachable or full", retry_after=1
        )

    def _write_inputs(self, slot: Slot, inputs: list[CallInput], sizes: list[int]) -> list[TensorRef]:
        refs: list[TensorRef] = []
        offset = slot.offset
        for tensor, size in zip(inputs, sizes, strict=True):
            if tensor.ref is not None:
                refs.append(tensor.ref)
                continue
            if tensor.arena_offset is not None:
                assert tensor.raw is not None
                at, nbytes = tensor.arena_offset, len(tensor.raw)  # already there: read in place
            else:
                at, nbytes = offset, tensor.nbytes()
                dest = self.arena.view(offset, nbytes)
                if tensor.raw is not None:
                    dest[:] = tensor.raw
                elif tensor.array is not None:
                    target = np.frombuffer(dest, dtype=tensor.array.dtype).reshape(tensor.array.shape)
                    np.copyto(target, tensor.array, casting="no")
                offset += size
            refs.append(TensorRef(tensor.name, tensor.datatype, tensor.shape, self.arena.name, at, nbytes))
        return refs

    def _read_outputs(self, reply: InferReply, spill: Segment | None) -> list[ResultTensor]:
        outputs: list[ResultTensor] = []
        for ref in reply.outputs:
            if ref.segment == self.arena.name:
                data: memoryview | None = self.arena.view(ref.offset, ref.nbytes)
            elif spill is not None and ref.segment == spill.name:
                data = spill.view(ref.offset, ref.nbytes)
            else:
                data = None  # a client's region: the client reads it there
            outputs.append(ResultTensor(ref.name, ref.datatype, list(ref.shape), data, ref.nbytes))
        return outputs


# A worker's refusal: HTTP status, code and Retry-After; any other status is a failed inference.
_REPLY_ERRORS: dict[int, tuple[int, str, float | None]] = {
    Status.BAD_INPUT: (422, "invalid_input", None),
    Status.OUTPUT_REGION: (400, "invalid_output_region", None),
    Status.DEADLINE: (504, "deadline_exceeded", None),
    Status.QUEUE_FULL: (503, "queue_full", 1),
}


def _reply_error(reply: InferReply, entry: ModelEntry) -> ApiError:
    if reply.status == Status.NOT_LOADED:
        model = f"{entry.model_id}:{entry.version}"
        return ApiError(503, "model_not_loaded", f"{model} is not loaded on the worker", retry_after=1)
    status, code, retry_after = _REPLY_ERRORS.get(reply.status, (500, "inference_failed", None))
    return ApiError(status, code, reply.error, retry_after=retry_after)
