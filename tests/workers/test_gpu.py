"""GPU placement: runs where a GPU and the CUDA provider are present, skips cleanly elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.models import linear, ort_run
from workers import device
from workers.runner import ModelRunner

GPUS = device.detect_gpu_count()
HAS_CUDA = GPUS > 0 and "CUDAExecutionProvider" in ort.get_available_providers()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU and CUDA provider"),
]


def test_workers_spread_over_gpus() -> None:
    placements = [device.plan(i, 4, list(range(GPUS)), device.available_cpus()) for i in range(4)]
    assert [p.gpu for p in placements] == [i % GPUS for i in range(4)]
    assert all(p.label.startswith("cuda:") for p in placements)


def test_cuda_session_matches_cpu(tmp_path: Path) -> None:
    path = linear(tmp_path / "m.onnx", features=16)
    runner = ModelRunner(path, device.plan(0, 1, [0], device.available_cpus()))
    assert runner.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    got = dict(zip(runner.output_names, runner.run({"x": x}), strict=True))
    expected = ort_run(path, {"x": x})
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["label"], expected["label"])
