"""Batches that fill: mean executed batch and req/s for a compute-bound MLP, batched vs not.

Builds an MLP with 4096-wide layers (512 -> 4096 -> 4096 -> 16; one onnxruntime
thread runs it several times faster per row at batch 32 than at batch 1), serves it
twice from one server start (``mlp4k`` unbatched, ``mlp4k_batched`` with
``max_batch_size``), drives each with wrk (1-row V2 binary requests, closed loop at
``--concurrency``) and reads the workers' ``model_server_batch_size_rows``
histogram before and after, so each line gives req/s and the mean rows per
executed batch::

    .venv/bin/python -m bench.burst_routing --concurrency 32 --duration 15

``MODEL_SERVER_BATCH_ROUTING_FILL=0`` in the environment measures least-busy
routing of the batched model; ``PYTHONPATH`` pointing at another checkout
measures that code with the same script (how the numbers before a change are taken).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import run_wrk
from bench.models import ReferenceModel, TensorInfo
from bench.payloads import BINARY_CONTENT_TYPE, Payload, v2_binary_body, v2_endpoint
from bench.peers import HOST, free_port

MODEL = ReferenceModel(
    name="mlp4k",
    description="MLP 512 -> 4096 -> 4096 -> 16, ReLU, FP32",
    inputs=(TensorInfo("x", "FP32", (-1, 512)),),
    outputs=(TensorInfo("y", "FP32", (-1, 16)),),
)
SIZES = (512, 4096, 4096, 16)


def build_mlp(path: Path, seed: int = 7) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        out = "y" if i == len(SIZES) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out if out == "y" else f"g{i}"]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp4k",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SIZES[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))


def batch_stats(url: str) -> dict[str, tuple[float, float]]:
    """model -> (executed batches, rows), summed over workers."""
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in ("model_server_batch_size_rows_count", "model_server_batch_size_rows_sum"):
                pair = out.setdefault(s.labels["model"], [0.0, 0.0])
                pair[0 if s.name.endswith("_count") else 1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def start_server(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    repo = work / "repo"
    for model_id in ("mlp4k", "mlp4k_batched"):
        target = repo / model_id / "1" / "model.onnx"
        target.parent.mkdir(parents=True)
        shutil.copyfile(work / "mlp4k.onnx", target)
    models = [
        {"model_id": "mlp4k", "version": "1"},
        {
            "model_id": "mlp4k_batched",
            "version": "1",
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_us": args.max_queue_delay_us,
        },
    ]
    (work / "models.yaml").write_text(yaml.safe_dump({"models": models}))
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="msbr-", dir="/tmp"))
    env = {
        **os.environ,
        "MODEL_SERVER_HOST": HOST,
        "MODEL_SERVER_PORT": str(port),
        "MODEL_SERVER_WORKERS": str(args.workers),
        "MODEL_SERVER_FRONTEND_PROCESSES": str(args.frontends),
        "MODEL_SERVER_RUN_DIR": str(run_dir),
        "MODEL_SERVER_INSTANCE": f"br{os.getpid()}",
        "MODEL_SERVER_MODEL_REPOSITORY": str(repo),
        "MODEL_SERVER_MODELS_FILE": str(work / "models.yaml"),
        "MODEL_SERVER_CACHE_DIR": str(work / "cache"),
        "MODEL_SERVER_ACCESS_LOG": "false",
        "MODEL_SERVER_GPUS": "none",
        "MODEL_SERVER_ORT_INTRA_OP_THREADS": "1",
        "MODEL_SERVER_DRAIN_SECONDS": "5",
    }
    exe = Path(sys.executable).parent / "model-server"
    log = (work / "server.log").open("ab")
    proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"server not ready; see {work / 'server.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="burst-routing-") as tmp:
        work = Path(tmp)
        build_mlp(work / "mlp4k.onnx")
        body, header_length = v2_binary_body(MODEL, np.ones((1, 512), np.float32))
        proc, url = start_server(work, args)
        try:
            for model_id in ("mlp4k", "mlp4k_batched"):
                (work / f"{model_id}.body").write_bytes(body)
                payload = Payload(
                    "v2-binary",
                    v2_endpoint(model_id),
                    work / f"{model_id}.body",
                    BINARY_CONTENT_TYPE,
                    header_length,
                    len(body),
                )
                before = batch_stats(url).get(model_id, (0.0, 0.0))
                rep = run_wrk(url, payload, args.concurrency, args.duration, 60)
                after = batch_stats(url).get(model_id, (0.0, 0.0))
                batches, rows = after[0] - before[0], after[1] - before[1]
                print(
                    f"{model_id:14s} c={args.concurrency} workers={args.workers} frontends={args.frontends}: "
                    f"{rep.rps:8.1f} req/s  p50 {rep.p50_ms:7.2f} ms  "
                    f"mean executed batch {rows / batches if batches else 0:5.2f} rows  errors {rep.errors}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
