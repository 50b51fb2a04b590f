"""V2 JSON in and out for peers that have no Open Inference Protocol of their own (LitServe).

Imports only numpy: it runs inside the peers' own virtualenvs. Decoding follows the
protocol the same way the other peers do it: flat or nested row-major ``data``, reshaped
to ``shape``, cast to the declared datatype; anything else is a ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

V2_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {np.dtype(v).name: k for k, v in V2_DTYPES.items()}


def decode_inputs(body: Any) -> dict[str, np.ndarray]:
    """``{"inputs": [{name, shape, datatype, data}]}`` -> arrays by input name."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ValueError("body must be a V2 inference request with a non-empty 'inputs' list")
    feeds: dict[str, np.ndarray] = {}
    for item in body["inputs"]:
        if not isinstance(item, dict):
            raise ValueError("each input must be an object")
        dtype = V2_DTYPES.get(str(item.get("datatype")))
        if dtype is None:
            raise ValueError(f"unsupported datatype {item.get('datatype')!r}")
        shape = [int(dim) for dim in item.get("shape", [])]
        feeds[str(item.get("name"))] = np.asarray(item.get("data"), dtype=dtype).reshape(shape)
    return feeds


def encode_outputs(model_name: str, names: list[str], arrays: list[np.ndarray]) -> dict[str, Any]:
    """Arrays -> a V2 inference response with flat row-major ``data``."""
    outputs = []
    for name, array in zip(names, arrays, strict=True):
        value = np.asarray(array)
        outputs.append(
            {
                "name": name,
                "shape": list(value.shape),
                "datatype": NUMPY_TO_V2.get(value.dtype.name, "BYTES"),
                "data": value.ravel().tolist(),
            }
        )
    return {"model_name": model_name, "model_version": "1", "outputs": outputs}
