"""ONNX Runtime sessions and arrays: the only module that imports onnxruntime.

No sockets and no shared memory here, so it is testable on its own. The
worker creates sessions only after its placement (GPU or CPU set) is applied.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import orjson
import psutil

from ipc.datatypes import ORT_TYPE_TO_OIP, numpy_dtype
from ipc.messages import ModelSchema

from .device import Placement

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]


class InputError(ValueError):
    """The request does not fit the model (wrong shape, type or names): HTTP 400/422."""


class RunError(RuntimeError):
    """ONNX Runtime failed on an input that looked valid: HTTP 500."""


def session_options(placement: Placement) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = placement.intra_op_threads
    # One request at a time per worker: parallelism comes from workers, not inter-op threads.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores other workers are pinned to.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def providers_for(placement: Placement) -> list[Any]:
    if placement.gpu is None:
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": placement.gpu}), "CPUExecutionProvider"]


class ModelRunner:
    """One InferenceSession plus what the serving loop needs to feed it."""

    def __init__(self, path: Path, placement: Placement, schema: ModelSchema | None = None) -> None:
        self.path = Path(path)
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options(placement), providers=providers_for(placement)
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise InputError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
        self.load_ms = (time.perf_counter() - started) * 1000
        rss_after = psutil.Process().memory_info().rss
        # Resident growth understates memory-mapped weights; the file size bounds it from below.
        self.memory_bytes = max(rss_after - rss_before, os.path.getsize(self.path))
        self.providers = self.session.get_providers()
        self.inputs = {i.name: (ORT_TYPE_TO_OIP.get(i.type, ""), i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.batched = bool(schema.batched) if schema else False

    def run(self, feeds: dict[str, Array], output_names: list[str] | None = None) -> list[Any]:
        missing = [name for name in self.inputs if name not in feeds]
        extra = [name for name in feeds if name not in self.inputs]
        if missing or extra:
            raise InputError(f"inputs do not match the model: missing {missing}, unexpected {extra}")
        try:
            return list(self.session.run(output_names or self.output_names, feeds))
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "INVALID_ARGUMENT" in message or "InvalidArgument" in type(exc).__name__:
                raise InputError(message) from None
            raise RunError(message) from None

    def warmup_feeds(self, rows: int = 1) -> dict[str, Array]:
        """Zeros of every input with variable dimensions set to ``rows`` / 1."""
        feeds: dict[str, Array] = {}
        for name, (datatype, shape) in self.inputs.items():
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape] or []
            if dims:
                dims[0] = rows if not (isinstance(shape[0], int) and shape[0] > 0) else dims[0]
            if datatype == "BYTES":
                feeds[name] = np.full(dims, "", dtype=object)
            else:
                feeds[name] = np.zeros(dims, dtype=numpy_dtype(datatype))
        return feeds

    def warmup(self) -> None:
        self.run(self.warmup_feeds())


def to_tensor(value: Any) -> Array:
    """ONNX Runtime outputs as arrays: sequences of maps (ZipMap) become BYTES rows of JSON."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        out = np.empty(len(value), dtype=object)
        out[:] = [orjson.dumps(item, option=orjson.OPT_NON_STR_KEYS) for item in value]
        return out
    raise RunError(f"unsupported output type {type(value).__name__}")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())
