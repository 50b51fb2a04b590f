"""The stack on a GPU machine: workers report CUDA devices and answer like onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.models import ort_run
from workers.device import detect_gpu_count

from .server import Server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(
        detect_gpu_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs an NVIDIA GPU and CUDA provider",
    ),
]


def test_workers_run_on_cuda(repository: Path) -> None:
    server = Server(repository, workers=2, MODEL_SERVER_GPUS="auto")
    try:
        server.start()
        c = server.client
        assert c.post("/v1/models/load", json={"model_id": "linear", "version": "1"}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'device="cuda:0"' in metrics
        x = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
        r = c.post(
            "/v1/infer", json={"model_id": "linear", "model_version": "1", "inputs": {"x": x.tolist()}}
        )
        assert r.status_code == 200, r.text
        expected = ort_run(repository / "linear" / "1" / "model.onnx", {"x": x})
        np.testing.assert_allclose([o["scores"] for o in r.json()["outputs"]], expected["scores"], rtol=1e-4)
        assert "CUDAExecutionProvider" in server.log()
    finally:
        server.stop()
