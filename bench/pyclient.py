"""A Python client loop for the paths wrk cannot drive: system shared memory, gRPC, and
binary HTTP sent by the same client so the first two can be compared honestly.

K client processes (spawned, one keep-alive ``http.client`` connection each) each loop
for a fixed time. Per request the client pays for what a real client pays for:

- ``py-binary``: build the body (JSON header + a copy of the input bytes), POST it,
  parse the JSON header of the reply and copy the binary outputs out of it.
- ``py-shm``: copy the input into its registered input region, POST a small JSON
  request naming the regions, parse the reply and copy the outputs out of the output
  regions. Regions are ``/dev/shm`` files opened with ``os.open`` + ``mmap`` (no
  resource tracker) and registered once with
  ``POST /v2/systemsharedmemory/region/{name}/register``.
- ``py-grpc``: ``tritonclient.grpc`` (KServe V2 ``GRPCInferenceService/ModelInfer``) with the
  input as ``raw_input_contents`` (its default), outputs copied out with ``as_numpy``.
  Concurrency above the process count runs as threads, each with its own channel
  (gRPC calls release the GIL), so c=32 does not need 32 processes on 2 cores.

So both rows include the client's copies; wrk's rows do not (wrk re-sends a fixed body
from memory and throws the reply away), which is why these rows are labelled with
their client and compared with each other, not with wrk's.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import mmap
import multiprocessing as mp
import os
import queue
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.models import REFERENCE_MODELS, ReferenceModel, sample_input
from bench.payloads import BINARY_CONTENT_TYPE, HEADER_LENGTH, v2_binary_header, v2_endpoint
from bench.stats import Rep, rep_from_latencies

DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
}
CLIENT_LABEL = "Python http.client, {k} process(es)"
GRPC_CLIENT_LABEL = "Python tritonclient.grpc, {p} process(es) x {t} thread(s)"
SETUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClientJob:
    host: str
    port: int
    model: str  # reference model name
    model_id: str
    path: str  # py-binary, py-shm or py-grpc
    batch: int
    duration_s: float
    warmup_s: float
    timeout_s: float = 30.0
    grpc_port: int = 0
    threads: int = 1  # concurrent loops per process (py-grpc only)


def grpc_layout(concurrency: int, max_processes: int) -> tuple[int, int]:
    """(processes, threads per process) for ``concurrency`` gRPC calls in flight; the product is
    the smallest multiple of the process count that reaches ``concurrency``."""
    processes = max(1, min(concurrency, max_processes))
    return processes, -(-concurrency // processes)


class Region:
    """A /dev/shm file mapped with mmap; unlinked on close."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.key = "/" + name
        self.size = size
        self.file = f"/dev/shm/{name}"
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.map)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)


class _Client:
    def __init__(self, job: ClientJob) -> None:
        self.job = job
        self.spec: ReferenceModel = REFERENCE_MODELS[job.model]
        self.conn = http.client.HTTPConnection(job.host, job.port, timeout=job.timeout_s)
        self.source = np.ascontiguousarray(sample_input(self.spec, job.batch))
        self.endpoint = v2_endpoint(job.model_id)
        self.regions: list[Region] = []
        self.outputs: list[tuple[str, np.ndarray]] = []
        self.input_view: np.ndarray | None = None
        if job.path == "py-binary":
            header = v2_binary_header(self.spec, self.source)
            self.header = json.dumps(header, separators=(",", ":")).encode()
            self.headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(self.header))}
            self.call = self._binary
        elif job.path == "py-shm":
            self._setup_shm()
            self.call = self._shm
        elif job.path == "py-grpc":
            self._setup_grpc()
            self.call = self._grpc
        else:
            raise ValueError(f"unknown client path {job.path!r}")

    # --- shared memory ---------------------------------------------------------------
    def _setup_shm(self) -> None:
        tag = f"msbench_{os.getpid()}"
        spec, batch = self.spec, self.job.batch
        region_in = Region(f"{tag}_in", self.source.nbytes)
        self.regions.append(region_in)
        self.input_view = region_in.view(self.source.dtype, self.source.shape)
        outputs = []
        for index, out in enumerate(spec.outputs):
            shape = spec.output_shape(out, batch)
            dtype = DTYPES[out.datatype]
            region = Region(f"{tag}_out{index}", int(np.prod(shape)) * dtype.itemsize)
            self.regions.append(region)
            self.outputs.append((out.name, region.view(dtype, shape)))
            outputs.append(
                {
                    "name": out.name,
                    "parameters": {
                        "shared_memory_region": region.name,
                        "shared_memory_byte_size": region.size,
                    },
                }
            )
        for region in self.regions:
            body = {"key": region.key, "offset": 0, "byte_size": region.size}
            self._post_json(f"/v2/systemsharedmemory/region/{region.name}/register", body)
        request = {
            "inputs": [
                {
                    "name": spec.input.name,
                    "shape": list(self.source.shape),
                    "datatype": spec.input.datatype,
                    "parameters": {
                        "shared_memory_region": region_in.name,
                        "shared_memory_byte_size": region_in.size,
                    },
                }
            ],
            "outputs": outputs,
        }
        self.request = json.dumps(request, separators=(",", ":")).encode()
        self.headers = {"Content-Type": "application/json"}

    def _post_json(self, url: str, body: dict[str, Any]) -> bytes:
        self.conn.request("POST", url, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {url}: HTTP {response.status} {data[:300]!r}")
        return data

    def _shm(self) -> list[np.ndarray]:
        assert self.input_view is not None
        np.copyto(self.input_view, self.source)
        self.conn.request("POST", self.endpoint, body=self.request, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} {data[:300]!r}")
        json.loads(data)
        return [view.copy() for _, view in self.outputs]

    # --- gRPC ------------------------------------------------------------------------
    def _setup_grpc(self) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient.InferenceServerClient(f"{self.job.host}:{self.job.grpc_port}")
        self.grpc_input = grpcclient.InferInput(
            self.spec.input.name, list(self.source.shape), self.spec.input.datatype
        )
        self.grpc_outputs = [out.name for out in self.spec.outputs]

    def _grpc(self) -> list[np.ndarray]:
        self.grpc_input.set_data_from_numpy(self.source)  # the client's copy into the request
        result = self.grpc.infer(self.job.model_id, [self.grpc_input], client_timeout=self.job.timeout_s)
        arrays = []
        for name in self.grpc_outputs:
            value = result.as_numpy(name)
            if value is None:
                raise RuntimeError(f"no output {name!r} in the gRPC response")
            arrays.append(value.copy())
        return arrays

    def reset(self) -> None:
        """After a failed call: HTTP reconnects on the next request; a gRPC channel recovers itself."""
        if self.job.path != "py-grpc":
            self.conn.close()

    # --- binary HTTP -----------------------------------------------------------------
    def _binary(self) -> list[np.ndarray]:
        body = self.header + self.source.tobytes()
        self.conn.request("POST", self.endpoint, body=body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} {data[:300]!r}")
        length = response.getheader(HEADER_LENGTH)
        header_len = int(length) if length else len(data)
        header = json.loads(data[:header_len])
        offset = header_len
        arrays = []
        for out in header.get("outputs", []):
            size = int(out.get("parameters", {}).get("binary_data_size", 0))
            if size:
                dtype = DTYPES.get(out["datatype"], np.dtype("u1"))
                arrays.append(
                    np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset).copy()
                )
                offset += size
        return arrays

    def close(self) -> None:
        if self.job.path == "py-grpc":
            self.grpc.close()
        for region in self.regions:
            with contextlib.suppress(Exception):
                self.conn.request("POST", f"/v2/systemsharedmemory/region/{region.name}/unregister", body=b"")
                self.conn.getresponse().read()
        self.outputs.clear()
        self.input_view = None
        for region in self.regions:
            region.close()
        self.conn.close()


@dataclass
class _Loop:
    """What one client loop measured."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0


def _timed_loop(client: _Client, duration_s: float, out: _Loop) -> None:
    clock = time.perf_counter
    begin = clock()
    end = begin + duration_s
    now = begin
    while now < end:
        try:
            client.call()
            after = clock()
            out.latencies.append(after - now)
        except Exception as exc:
            out.errors += 1
            out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
            after = clock()
            client.reset()
        now = after
    out.elapsed_s = now - begin


def _run_loops(clients: list[_Client], duration_s: float) -> list[_Loop]:
    """One loop per client: in this thread for one, in threads for several (gRPC)."""
    loops = [_Loop() for _ in clients]
    if len(clients) == 1:
        _timed_loop(clients[0], duration_s, loops[0])
        return loops
    threads = [
        threading.Thread(target=_timed_loop, args=(client, duration_s, loop), daemon=True)
        for client, loop in zip(clients, loops, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return loops


def _client_main(job: ClientJob, ready: Any, start: Any, abort: Any, results: Any) -> None:
    clients: list[_Client] = []
    try:
        try:
            clients = [_Client(job) for _ in range(max(1, job.threads))]
            warm = _run_loops(clients, job.warmup_s)
            if any(loop.errors and not loop.latencies for loop in warm):
                raise RuntimeError(next(loop.first_error for loop in warm if loop.first_error))
        except Exception as exc:
            ready.put(f"{type(exc).__name__}: {exc}")
            return
        ready.put("")
        start.wait(SETUP_TIMEOUT_S)
        if abort.is_set() or not start.is_set():
            return
        loops = _run_loops(clients, job.duration_s)
        latencies = array("d")
        for loop in loops:
            latencies.extend(loop.latencies)
        errors = sum(loop.errors for loop in loops)
        first_error = next((loop.first_error for loop in loops if loop.first_error), "")
        results.put((latencies.tobytes(), max(loop.elapsed_s for loop in loops), errors, first_error))
    finally:
        for client in clients:
            client.close()  # unregisters and unlinks its regions, also on Ctrl-C


def run_clients(job: ClientJob, processes: int) -> Rep:
    """Run ``processes`` client processes for ``job.duration_s``; one repetition."""
    ctx = mp.get_context("spawn")
    ready, start, abort, results = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, args=(job, ready, start, abort, results)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        problems = [ready.get(timeout=SETUP_TIMEOUT_S + job.warmup_s) for _ in procs]
        failed = [p for p in problems if p]
        if failed:
            abort.set()
            start.set()
            raise RuntimeError(f"client setup failed: {failed[0]}")
        start.set()
        latencies: list[float] = []
        durations: list[float] = []
        errors = 0
        first_error = ""
        for _ in procs:
            raw, duration, errs, err_text = results.get(timeout=job.duration_s + job.timeout_s + 30)
            chunk = array("d")
            chunk.frombytes(raw)
            latencies.extend(chunk)
            durations.append(duration)
            errors += errs
            first_error = first_error or err_text
    except queue.Empty:
        abort.set()
        start.set()
        raise RuntimeError("client processes did not report in time") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    rep = rep_from_latencies(latencies, max(durations), errors)
    if first_error:
        rep.error_detail = {"client": errors}
    return rep
