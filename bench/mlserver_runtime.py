"""MLServer custom runtime serving an ONNX file with onnxruntime.

MLServer's documented way to serve a framework it has no runtime for: subclass
``mlserver.MLModel``, open the model in ``load()``, decode the V2 inputs with
``NumpyCodec`` in ``predict()``, run, encode the outputs. Imported only inside the
benchmark's MLServer virtualenv (``.venv-bench``), which puts the repository root on
``PYTHONPATH`` so ``model-settings.json`` can name ``bench.mlserver_runtime.OnnxRuntimeModel``.

Session options are ``bench.ort_options``'s, as for raw onnxruntime and this server's
workers in the benchmark.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found, unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found, unused-ignore]
from mlserver.types import (  # type: ignore[import-not-found, unused-ignore]
    InferenceRequest,
    InferenceResponse,
)
from mlserver.utils import get_model_uri  # type: ignore[import-not-found, unused-ignore]

from bench.ort_options import session_options


class OnnxRuntimeModel(MLModel):  # type: ignore[misc, unused-ignore]
    """One onnxruntime InferenceSession per model (per MLServer worker process)."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        self._session = ort.InferenceSession(uri, session_options(), providers=["CPUExecutionProvider"])
        self._output_names = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds: dict[str, Any] = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._output_names, results, strict=True)
            ],
        )
