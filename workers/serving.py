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

        Never raises: whatever goes wrong with one request becomes its error reply,
        so no request can take the worker (and every other request on it) down.
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
        try:
            feeds = self._read_inputs(request)
        except (InputError, SegmentError) as exc:
            self.cache.release(entry)
            return [(peer, InferReply(request.seq, Status.BAD_INPUT, str(exc)))]
        except Exception as exc:
            self.cache.release(entry)
            return [(peer, _internal(request, exc))]
        queue = self.queues.get(key)
        if queue is None or queue.policy != policy:
            queue = self.queues[key] = ModelQueue(policy)
        if queue.full():
            self.cache.release(entry)
            return [(peer, InferReply(request.seq, Status.QUEUE_FULL, f"queue of {key[0]}:{key[1]} is full"))]
        rows = rows_of(feeds)
        if rows < 1:
            # Zero rows (or inputs that disagree on them) run alone: nothing to merge.
            return self._run([job], [feeds])
        queue.pending.append(Pending(job, feeds, rows, now_ns, signature_of(feeds, request.output_names)))
        return self.flush(now_ns) if queue.ready(now_ns) else []

    def flush(self, now_ns: int | None = None, force: bool = False) -> Out:
        """Run every queue whose batch is full or whose oldest request waited long enough."""
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        out: Out = []
        for key in list(self.queues):
            queue = self.queues[key]
            while queue.pending and (force or queue.ready(now_ns)):
                batch = queue.take()
                jobs = [p.item for p in batch]
                try:
                    out.extend(self._run(jobs, [p.feeds for p in batch]))
                except Exception as exc:
                    # _run contains its own failures; this is the last guard: fail this batch only.
                    out.extend((job.peer, _internal(job.request, exc)) for job in jobs)
            if not queue.pending:
                del self.queues[key]
        return out

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
        """One ONNX Runtime call for all ``jobs``; every job's pin is released here."""
        model = jobs[0].entry.value
        first = jobs[0].request
        out: Out = []
        token = request_id_var.set(
            first.trace_id if len(jobs) == 1 else f"batch:{first.trace_id}+{len(jobs) - 1}"
        )
        model_token = model_var.set(f"{first.model_id}:{first.version}")  # JSON logs' "model"
        self.running += len(jobs)
        try:
            now = time.monotonic_ns()
            live: list[Job] = []
            live_feeds: list[dict[str, Array]] = []
            for i, job in enumerate(jobs):
                if now > job.request.deadline_ns:
                    out.append(
                        (job.peer, InferReply(job.request.seq, Status.DEADLINE, "deadline passed in queue"))
                    )
                    continue
                live.append(job)
                if feeds_list is not None:
                    live_feeds.append(feeds_list[i])
            if not live:
                return out
            try:
                if feeds_list is None:
                    live_feeds = [self._read_inputs(job.request) for job in live]
                feeds = merge(live_feeds)
                started = time.monotonic_ns()
                results = [to_tensor(r) for r in model.runner.run(feeds, first.output_names or None)]
                finished = time.monotonic_ns()
            except (InputError, SegmentError) as exc:
                if len(live) > 1:
                    # One bad request must not fail its batch-mates: run them one by one.
                    return out + self._run_each(live, live_feeds)
                log.info("rejected input for %s:%s: %s", first.model_id, first.version, exc)
                return [*out, (live[0].peer, InferReply(live[0].request.seq, Status.BAD_INPUT, str(exc)))]
            except Exception as exc:
                # RunError (onnxruntime refused a valid-looking input) or anything unexpected.
                if len(live) > 1:
                    # The batch failed: retry its requests one by one, so only the culprit fails.
                    return out + self._run_each(live, live_feeds)
                return out + [(j.peer, _internal(j.request, exc)) for j in live]
            names = first.output_names or model.runner.output_names
            rows = [rows_of(f) for f in live_feeds]
            if len(live) == 1:
                per_job = [results]
            else:
                try:
                    per_job = split(results, rows)
                except ValueError as exc:
                    log.warning(
                        "model %s:%s cannot be batched (%s); serving unmerged",
                        first.model_id,
                        first.version,
                        exc,
                    )
                    model.policy = None
                    return out + self._run_each(live, live_feeds)
            total_rows = sum(r for r in rows if r > 0)
            metrics.BATCH_ROWS.labels(first.model_id, first.version, self.worker_label).observe(total_rows)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "ran %s:%s: %d request(s), %d row(s), %d us",
                    first.model_id,
                    first.version,
                    len(live),
                    total_rows,
                    (finished - started) // 1000,
                )
            self.executed_batches[total_rows] = self.executed_batches.get(total_rows, 0) + 1
            for job, arrays in zip(live, per_job, strict=True):
                try:
                    reply = self._write_outputs(job.request, names, arrays)
                except Exception as exc:
                    reply = _internal(job.request, exc)
                reply.queue_us = (started - job.arrival_ns) // 1000
                reply.compute_us = (finished - started) // 1000
                reply.batch_rows = total_rows
                out.append((job.peer, reply))
            return out
        finally:
            self.running -= len(jobs)
            for job in jobs:
                self.cache.release(job.entry)
            request_id_var.reset(token)
            model_var.reset(model_token)

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
        encoded: list[tuple[str, str, list[int], memoryview]] = []
        for name, arr in zip(names, arrays, strict=True):
            datatype = datatypes.oip_datatype(arr.dtype)
            if datatype == "BYTES":
                raw = memoryview(datatypes.serialize_bytes(arr))
            else:
                # Flat bytes via a uint8 view: memoryview.cast refuses zero-row arrays.
                raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
            encoded.append((name, datatype, list(arr.shape), raw))
        client = {ref.name: ref for ref in request.client_outputs}
        refs: list[TensorRef] = []
        # Outputs bound for client regions go there; the rest share the output slot.
        pooled = [e for e in encoded if e[0] not in client]
        need = sum(_align(len(e[3])) for e in pooled)
        spill_name = ""
        if need <= request.out_capacity:
            segment, base = request.out_segment, request.out_offset
        else:
            seg = self.spill.create(need)
            segment, base, spill_name = seg.name, 0, seg.name
            self.segments.adopt(seg)  # mapped until written, then handed over
        try:
            offset = base
            for name, datatype, shape, raw in encoded:
                target = client.get(name)
                if target is not None:
                    if len(raw) > target.nbytes:
                        return InferReply(
                            request.seq,
                            Status.OUTPUT_REGION,
                            f"output {name!r} needs {len(raw)} bytes; its shared-memory region "
                            f"{target.segment!r} holds {target.nbytes}",
                            spill=spill_name,  # the frontend owns (and unlinks) it all the same
                        )
                    if self._client_region(target.segment):
                        client_shm.write(target.segment, target.offset, raw)
                    else:
                        self.segments.view(target.segment, target.offset, len(raw))[:] = raw
                    refs.append(TensorRef(name, datatype, shape, target.segment, target.offset, len(raw)))
                    continue
                self.segments.view(segment, offset, len(raw))[:] = raw
                refs.append(TensorRef(name, datatype, shape, segment, offset, len(raw)))
                offset += _align(len(raw))
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
