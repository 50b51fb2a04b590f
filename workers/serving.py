"""The worker's request path: shared-memory descriptors in, one ONNX Runtime call, descriptors out.

``Engine`` is the worker's core, free of sockets: the process shell hands it
decoded ``InferRequest`` messages with an opaque ``peer`` (the frontend's
routing id) and sends back whatever ``(peer, InferReply)`` pairs it returns.

Inputs are numpy views over the frontend's arena (no copy) unless requests are
merged into one batch; a client's registered region (V2 shm) is never mapped but
copied in and out with pread/pwrite (``ipc.client_shm``), so a client that
truncates it cannot raise SIGBUS here. No request can take the worker down:
every failure while decoding, running or encoding one becomes its error reply,
and a merged batch that fails is retried one request at a time.

Outputs are copied once, from ONNX Runtime's arrays into the request's output
slot, a client's registered region, or a spill segment when the slot is too
small (see ``ipc.arena`` for who owns what).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ipc import client_shm, datatypes
from ipc.arena import ALIGNMENT, SHM_DIR, SegmentCache, SegmentError, SpillWriter
from ipc.messages import BatchConfig, InferReply, InferRequest, ModelSchema, Status, TensorRef
from model_server import metrics
from model_server.logs import model_var, request_id_var

from .batching import ModelQueue, Pending, Policy, merge, rows_of, signature_of, split
from .runner import InputError, ModelRunner, RunError, to_tensor
from .session_cache import Entry, SessionCache

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Peer = bytes
Out = list[tuple[Peer, InferReply]]


@dataclass
class LoadedModel:
    """What a worker keeps per (model_id, version)."""

    runner: ModelRunner
    schema: ModelSchema
    batching: BatchConfig
    policy: Policy | None  # None: this model is never merged


@dataclass
class Job:
    peer: Peer
    request: InferRequest
    entry: Entry[LoadedModel]
    arrival_ns: int


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class Engine:
    def __init__(
        self,
        cache: SessionCache[LoadedModel],
        segments: SegmentCache,
        spill: SpillWriter,
        default_batching: BatchConfig,
        worker_index: int = 0,
    ) -> None:
        self.cache = cache
        self.segments = segments
        self.spill = spill
        self.default_batching = default_batching
        self.queues: dict[tuple[str, str], ModelQueue[Job]] = {}
        self.executed_batches: dict[int, int] = {}  # rows -> count, for metrics
        self.running = 0
        self.worker_label = str(worker_index)

    # --- policy ----------------------------------------------------------------------
    def policy_for(self, schema: ModelSchema, batching: BatchConfig) -> Policy | None:
        d = self.default_batching
        max_batch = batching.max_batch_size or d.max_batch_size
        if max_batch <= 1 or not schema.batched:
            return None
        return Policy(
            max_batch_size=max_batch,
            max_queue_delay_ns=(batching.max_queue_delay_us or d.max_queue_delay_us) * 1000,
            preferred_batch_sizes=tuple(sorted(batching.preferred_batch_sizes or d.preferred_batch_sizes)),
            max_queue_size=batching.max_queue_size or d.max_queue_size,
        )

    # --- entry points ------------------------------------------------------------------
    def submit(self, peer: Peer, request: InferRequest, now_ns: int | None = None) -> Out:
        """Take one request: answer it now, or queue it for a merged batch.

        A queued request waits for ``flush``, which the process shell calls once it
        has drained every request already sitting in its socket, so a batch is formed
        from all of them. Never raises: whatever goes wrong with one request becomes
        its error reply, so no request can take the worker (and every other request
        on it) down.
        """
        try:
            return self._submit(peer, request, now_ns)
        except Exception as exc:
            return [(peer, _internal(request, exc))]

    def _submit(self, peer: Peer, request: InferRequest, now_ns: int | None) -> Out:
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        if now_ns > request.deadline_ns:
            return [
                (peer, InferReply(request.seq, Status.DEADLINE, "deadline passed before the worker began"))
            ]
        key = (request.model_id, request.version)
        entry = self.cache.acquire(key)
        if entry is None:
            return [
                (peer, InferReply(request.seq, Status.NOT_LOADED, f"model {key[0]}:{key[1]} is not loaded"))
            ]
        job = Job(peer, request, entry, now_ns)
        policy = entry.value.policy
        if policy is None:
            return self._run([job])
        return self._enqueue(job, policy)

    def _enqueue(self, job: Job, policy: Policy) -> Out:
        """Queue a batchable request; one that cannot be queued is answered (and unpinned) here."""
        request = job.request
        key = (request.model_id, request.version)
        try:
            feeds = self._read_inputs(request)
        except (InputError, SegmentError) as exc:
            reply = InferReply(request.seq, Status.BAD_INPUT, str(exc))
        except Exception as exc:
            reply = _internal(request, exc)
        else:
            queue = self.queues.get(key)
            if queue is None or queue.policy != policy:
                queue = self.queues[key] = ModelQueue(policy)
            rows = rows_of(feeds)
            if queue.full():
                reply = InferReply(request.seq, Status.QUEUE_FULL, f"queue of {key[0]}:{key[1]} is full")
            elif rows < 1:
                # Zero rows (or inputs that disagree on them) run alone: nothing to merge.
                return self._run([job], [feeds])
            else:
                signature = signature_of(feeds, request.output_names)
                queue.pending.append(Pending(job, feeds, rows, job.arrival_ns, signature))
                return []
        self.cache.release(job.entry)
        return [(job.peer, reply)]

    def flush(self, now_ns: int | None = None, force: bool = False) -> Out:
        """Run one batch of every queue that is ready (full, preferred size, or waited long enough).

        One batch per queue per call: the shell drains its socket again before the
        next, so requests that arrived while a batch ran join the one after it.
        ``force`` (shutdown) runs everything queued.
        """
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        out: Out = []
        for key in list(self.queues):
            queue = self.queues[key]
            while queue.pending and (force or queue.ready(now_ns)):
                out.extend(self._run_batch(queue.take()))
                if not force:
                    break
            if not queue.pending:
                del self.queues[key]
        return out

    def _run_batch(self, batch: list[Pending[Job]]) -> Out:
        jobs = [p.item for p in batch]
        try:
            return self._run(jobs, [p.feeds for p in batch])
        except Exception as exc:
            # _run contains its own failures; this is the last guard: fail this batch only.
            return [(job.peer, _internal(job.request, exc)) for job in jobs]

    def ready_now(self, now_ns: int | None = None) -> bool:
        """Whether a queued batch is ready, so the shell should not block waiting for more."""
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        return any(q.ready(now_ns) for q in self.queues.values())

    def next_due_ns(self) -> int | None:
        dues = [d for q in self.queues.values() if (d := q.due_ns()) is not None]
        return min(dues) if dues else None

    @property
    def queued(self) -> int:
        return sum(len(q.pending) for q in self.queues.values())

    # --- execution ---------------------------------------------------------------------
    def _read_inputs(self, request: InferRequest) -> dict[str, Array]:
        feeds: dict[str, Array] = {}
        for ref in request.inputs:
            feeds[ref.name] = self._input_array(ref)
        return feeds

    def _client_region(self, segment: str) -> bool:
        """A client's registered region (V2 shm), as opposed to the server's own segments."""
        return not segment.startswith(self.segments.trusted_prefix)

    def _input_array(self, ref: TensorRef) -> Array:
        if self._client_region(ref.segment):
            # Copied out, never mapped: see ipc.client_shm (a truncated region cannot SIGBUS us).
            view = client_shm.read(ref.segment, ref.offset, ref.nbytes).data
        else:
            view = self.segments.view(ref.segment, ref.offset, ref.nbytes)
        count = 1
        for dim in ref.shape:
            if dim < 0:
                raise InputError(f"input {ref.name!r} has a negative dimension in shape {ref.shape}")
            count *= dim
        if ref.datatype == "BYTES":
            try:
                items = datatypes.deserialize_bytes(view, count)
            except ValueError as exc:
                raise InputError(f"input {ref.name!r}: {exc}") from None
            # ONNX Runtime's string tensors take str.
            decoded = np.array([b.decode("utf-8", "replace") for b in items], dtype=object)
            return decoded.reshape(ref.shape)
        try:
            dtype = datatypes.numpy_dtype(ref.datatype)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if count * dtype.itemsize != ref.nbytes:
            raise InputError(
                f"input {ref.name!r}: shape {ref.shape} of {ref.datatype} needs "
                f"{count * dtype.itemsize} bytes, got {ref.nbytes}"
            )
        arr = np.frombuffer(view, dtype=dtype, count=count).reshape(ref.shape)
        # A tensor placed right after another of a smaller element type (binary bodies are
        # streamed in place) can be misaligned: copy it rather than hand ONNX Runtime that.
        return arr if arr.flags.aligned else arr.copy()

    def _run(self, jobs: list[Job], feeds_list: list[dict[str, Array]] | None = None) -> Out:
        """One ONNX Runtime call for all ``jobs``; every job's pin is released here.

        ``feeds_list`` carries the inputs already read for queued jobs; without it
        (a single unqueued job) they are read here.
        """
        first = jobs[0].request
        token = request_id_var.set(
            first.trace_id if len(jobs) == 1 else f"batch:{first.trace_id}+{len(jobs) - 1}"
        )
        model_token = model_var.set(f"{first.model_id}:{first.version}")  # JSON logs' "model"
        self.running += len(jobs)
        try:
            out, live, live_feeds = _drop_expired(jobs, feeds_list, time.monotonic_ns())
            if live:
                out.extend(self._execute(live, live_feeds))
            return out
        finally:
            self.running -= len(jobs)
            for job in jobs:
                self.cache.release(job.entry)
            request_id_var.reset(token)
            model_var.reset(model_token)

    def _execute(self, live: list[Job], feeds_list: list[dict[str, Array]] | None) -> Out:
        model = live[0].entry.value
        first = live[0].request
        try:
            if feeds_list is None:
                feeds_list = [self._read_inputs(job.request) for job in live]
            feeds = merge(feeds_list)
            started = time.monotonic_ns()
            results = [to_tensor(r) for r in model.runner.run(feeds, first.output_names or None)]
            finished = time.monotonic_ns()
        except Exception as exc:
            if len(live) > 1 and feeds_list is not None:
                # One bad request must not fail its batch-mates: run them one by one.
                return self._run_each(live, feeds_list)
            return [(job.peer, _failure_reply(job.request, exc)) for job in live]
        rows = [rows_of(f) for f in feeds_list]
        per_job = self._split(model, live, feeds_list, results, rows)
        if per_job is None:
            return self._run_each(live, feeds_list)
        total_rows = sum(r for r in rows if r > 0)
        self._record_batch(first, len(live), total_rows, finished - started)
        names = first.output_names or model.runner.output_names
        out: Out = []
        for job, arrays in zip(live, per_job, strict=True):
            reply = self._reply_with_outputs(job.request, names, arrays)
            reply.queue_us = (started - job.arrival_ns) // 1000
            reply.compute_us = (finished - started) // 1000
            reply.batch_rows = total_rows
            out.append((job.peer, reply))
        return out

    def _split(
        self,
        model: LoadedModel,
        live: list[Job],
        feeds_list: list[dict[str, Array]],
        results: list[Array],
        rows: list[int],
    ) -> list[list[Array]] | None:
        """Each job's rows of the outputs; None when the model turns out not to be batchable."""
        if len(live) == 1:
            return [results]
        try:
            return split(results, rows)
        except ValueError as exc:
            first = live[0].request
            log.warning(
                "model %s:%s cannot be batched (%s); serving unmerged", first.model_id, first.version, exc
            )
            model.policy = None
            return None

    def _record_batch(self, first: InferRequest, requests: int, total_rows: int, compute_ns: int) -> None:
        metrics.BATCH_ROWS.labels(first.model_id, first.version, self.worker_label).observe(total_rows)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "ran %s:%s: %d request(s), %d row(s), %d us",
                first.model_id,
                first.version,
                requests,
                total_rows,
                compute_ns // 1000,
            )
        self.executed_batches[total_rows] = self.executed_batches.get(total_rows, 0) + 1

    def _reply_with_outputs(self, request: InferRequest, names: list[str], arrays: list[Array]) -> InferReply:
        try:
            return self._write_outputs(request, names, arrays)
        except Exception as exc:
            return _internal(request, exc)

    def _run_each(self, jobs: list[Job], feeds_list: list[dict[str, Array]]) -> Out:
        out: Out = []
        for job, feeds in zip(jobs, feeds_list, strict=True):
            entry = self.cache.acquire((job.request.model_id, job.request.version))
            if entry is None:
                out.append((job.peer, InferReply(job.request.seq, Status.NOT_LOADED, "model was unloaded")))
                continue
            out.extend(self._run([Job(job.peer, job.request, entry, job.arrival_ns)], [feeds]))
        return out

    def _write_outputs(self, request: InferRequest, names: list[str], arrays: list[Array]) -> InferReply:
        encoded = [_encode_output(name, arr) for name, arr in zip(names, arrays, strict=True)]
        client = {ref.name: ref for ref in request.client_outputs}
        # Outputs bound for client regions go there; the rest share the output slot.
        need = sum(_align(len(e.raw)) for e in encoded if e.name not in client)
        spill_name = ""
        if need <= request.out_capacity:
            segment, offset = request.out_segment, request.out_offset
        else:
            seg = self.spill.create(need)
            segment, offset, spill_name = seg.name, 0, seg.name
            self.segments.adopt(seg)  # mapped until written, then handed over
        try:
            refs: list[TensorRef] = []
            for out in encoded:
                target = client.get(out.name)
                if target is None:
                    refs.append(self._write_pooled(out, segment, offset))
                    offset += _align(len(out.raw))
                elif len(out.raw) > target.nbytes:
                    return _region_too_small(request, out, target, spill_name)
                else:
                    refs.append(self._write_client(out, target))
        except SegmentError as exc:
            return InferReply(request.seq, Status.OUTPUT_REGION, str(exc), spill=spill_name)
        except Exception:
            if spill_name:
                # No reply will hand the spill over: it is still ours to remove.
                with contextlib.suppress(OSError):
                    os.unlink(SHM_DIR / spill_name)
            raise
        finally:
            if spill_name:
                # The frontend owns the spill from here; we only drop our mapping.
                self.segments.forget(spill_name)
        return InferReply(request.seq, Status.OK, outputs=refs, spill=spill_name)

    def _write_pooled(self, out: EncodedOutput, segment: str, offset: int) -> TensorRef:
        self.segments.view(segment, offset, len(out.raw))[:] = out.raw
        return TensorRef(out.name, out.datatype, out.shape, segment, offset, len(out.raw))

    def _write_client(self, out: EncodedOutput, target: TensorRef) -> TensorRef:
        if self._client_region(target.segment):
            client_shm.write(target.segment, target.offset, out.raw)
        else:
            self.segments.view(target.segment, target.offset, len(out.raw))[:] = out.raw
        return TensorRef(out.name, out.datatype, out.shape, target.segment, target.offset, len(out.raw))


@dataclass
class EncodedOutput:
    name: str
    datatype: str
    shape: list[int]
    raw: memoryview


def _encode_output(name: str, arr: Array) -> EncodedOutput:
    datatype = datatypes.oip_datatype(arr.dtype)
    if datatype == "BYTES":
        raw = memoryview(datatypes.serialize_bytes(arr))
    else:
        # Flat bytes via a uint8 view: memoryview.cast refuses zero-row arrays.
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
    return EncodedOutput(name, datatype, list(arr.shape), raw)


def _region_too_small(request: InferRequest, out: EncodedOutput, target: TensorRef, spill: str) -> InferReply:
    return InferReply(
        request.seq,
        Status.OUTPUT_REGION,
        f"output {out.name!r} needs {len(out.raw)} bytes; its shared-memory region "
        f"{target.segment!r} holds {target.nbytes}",
        spill=spill,  # the frontend owns (and unlinks) it all the same
    )


def _drop_expired(
    jobs: list[Job], feeds_list: list[dict[str, Array]] | None, now_ns: int
) -> tuple[Out, list[Job], list[dict[str, Array]] | None]:
    """Deadline replies for jobs whose deadline passed in the queue; the live jobs and their feeds."""
    out: Out = []
    live: list[Job] = []
    live_feeds: list[dict[str, Array]] = []
    for i, job in enumerate(jobs):
        if now_ns > job.request.deadline_ns:
            out.append((job.peer, InferReply(job.request.seq, Status.DEADLINE, "deadline passed in queue")))
            continue
        live.append(job)
        if feeds_list is not None:
            live_feeds.append(feeds_list[i])
    return out, live, live_feeds if feeds_list is not None else None


def _failure_reply(request: InferRequest, exc: Exception) -> InferReply:
    """A lone request's failure: its input at fault (400/422) or anything else (500)."""
    if isinstance(exc, (InputError, SegmentError)):
        log.info("rejected input for %s:%s: %s", request.model_id, request.version, exc)
        return InferReply(request.seq, Status.BAD_INPUT, str(exc))
    # RunError (onnxruntime refused a valid-looking input) or anything unexpected.
    return _internal(request, exc)


def _internal(request: InferRequest, exc: Exception) -> InferReply:
    """The reply for an unexpected failure of one request: logged with its id, the worker goes on."""
    token = request_id_var.set(request.trace_id)
    model_token = model_var.set(f"{request.model_id}:{request.version}")
    try:
        log.error(
            "request %s for %s:%s failed: %s",
            request.trace_id,
            request.model_id,
            request.version,
            exc,
            exc_info=not isinstance(exc, RunError),
        )
    finally:
        request_id_var.reset(token)
        model_var.reset(model_token)
    message = str(exc) if isinstance(exc, RunError) else f"inference failed: {type(exc).__name__}"
    return InferReply(request.seq, Status.INTERNAL, message)
