"""PyTriton 0.7 serving the reference ONNX models: the real ``tritonserver`` with its Python backend.

Run inside ``.venv-pytriton`` (made from the system Python 3.11, whose ``libpython3.11``
the backend stub links) by :class:`bench.peers.PyTritonPeer`::

    python -m bench.pytriton_server --http-port P --grpc-port G --metrics-port M \
        --instances 2 tabular=/path/tabular.onnx mlp=/path/mlp.onnx mlp_batched=/path/mlp.onnx

Each model is bound with ``--instances`` inference callables (Triton model instances),
each holding its own onnxruntime session with :func:`bench.ort_options.session_options`
(one thread), like this server's workers. Ids ending in ``_batched`` get Triton's
dynamic batcher (``max_batch_size`` rows, ``--queue-delay-us``); the others are served
without batching, variable first dimension, one request per execution.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from pytriton.decorators import batch  # type: ignore[import-not-found, unused-ignore]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found, unused-ignore]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found, unused-ignore]

from bench.ort_options import session_options

BATCHED_SUFFIX = "_batched"  # bench.models.BATCHED_SUFFIX, not imported: this venv has no onnx
ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def make_infer(model_path: str) -> tuple[Callable[..., dict[str, np.ndarray]], Any]:
    """One model instance: an onnxruntime session and the batched callable around it."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, session_options(), providers=["CPUExecutionProvider"])
    output_names = [output.name for output in session.get_outputs()]

    @batch  # type: ignore[misc, untyped-decorator, unused-ignore]
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(output_names, inputs)
        return dict(zip(output_names, results, strict=True))

    return infer, session


def tensors(args: Any, batched: bool) -> list[Any]:
    """PyTriton tensor specs from onnxruntime's; the batch dimension is Triton's when batching."""
    specs = []
    for arg in args:
        dims = [d if isinstance(d, int) else -1 for d in arg.shape]
        shape = tuple(dims[1:]) if batched else tuple(dims)
        specs.append(Tensor(name=arg.name, dtype=ORT_TO_NUMPY[arg.type], shape=shape))
    return specs


def bind(triton: Any, model_id: str, path: str, instances: int, max_batch: int, delay_us: int) -> None:
    callables, sessions = zip(*(make_infer(path) for _ in range(instances)), strict=True)
    batched = model_id.endswith(BATCHED_SUFFIX)
    config = (
        ModelConfig(
            batching=True,
            max_batch_size=max_batch,
            batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us),
        )
        if batched
        else ModelConfig(batching=False)
    )
    triton.bind(
        model_name=model_id,
        infer_func=list(callables),
        inputs=tensors(sessions[0].get_inputs(), batched),
        outputs=tensors(sessions[0].get_outputs(), batched),
        config=config,
        strict=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=2, help="model instances (onnxruntime sessions)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("models", nargs="+", metavar="ID=PATH")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = TritonConfig(
        http_address=args.host,
        http_port=args.http_port,
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        metrics_address=args.host,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        for item in args.models:
            model_id, path = item.split("=", 1)
            bind(triton, model_id, path, args.instances, args.max_batch_size, args.queue_delay_us)
        triton.serve()


if __name__ == "__main__":
    main()
