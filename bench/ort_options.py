"""The onnxruntime session options every peer runs with, in one place so the comparison
stays fair: one intra-op and one inter-op thread, sequential execution, full graph
optimisation. Imports only onnxruntime: MLServer's virtualenv imports it too
(``bench.mlserver_runtime``), and raw onnxruntime (``bench.ort_raw``) uses the same."""

from __future__ import annotations

import onnxruntime as ort


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options
