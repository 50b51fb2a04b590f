"""Tensor datatypes: Open Inference Protocol names, numpy dtypes and ONNX element types.

One table so the frontend (which never imports onnx or onnxruntime), the
coordinator (which reads ONNX graphs) and the workers (which speak to ONNX
Runtime) agree on every name. ``BYTES`` tensors travel in shared memory in the
Triton/OIP binary layout: per element, a 4-byte little-endian length then the
bytes.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np
import numpy.typing as npt

# OIP datatype -> numpy dtype (little-endian). BYTES maps to object arrays.
OIP_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

NUMPY_TO_OIP: Final[dict[np.dtype[np.generic], str]] = {
    dt: name for name, dt in OIP_TO_NUMPY.items() if name != "BYTES"
}

# ONNX TensorProto.DataType values (kept numeric so nothing here imports onnx).
ONNX_ELEM_TO_OIP: Final[dict[int, str]] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}

# ONNX Runtime type strings (NodeArg.type) -> OIP.
ORT_TYPE_TO_OIP: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

SUPPORTED: Final = frozenset(OIP_TO_NUMPY)
KNOWN: Final = SUPPORTED | {"BF16"}

_LEN = struct.Struct("<I")


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (BYTES has none)."""
    if datatype == "BYTES":
        raise ValueError("BYTES has no fixed element size")
    return OIP_TO_NUMPY[datatype].itemsize


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        raise ValueError(f"unsupported datatype {datatype!r}") from None


def oip_datatype(dtype: np.dtype[np.generic]) -> str:
    """OIP name of a numpy dtype; str/bytes/object arrays are BYTES."""
    if dtype.kind in {"O", "U", "S"}:
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise ValueError(f"no protocol datatype for numpy {dtype}") from None


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Flatten a BYTES tensor (str/bytes elements) to length-prefixed bytes, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(buffer: memoryview | bytes, count: int | None = None) -> npt.NDArray[np.object_]:
    """Inverse of :func:`serialize_bytes`; raises ValueError on a truncated buffer."""
    view = memoryview(buffer)
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end and (count is None or len(items) < count):
        if pos + 4 > end:
            raise ValueError("BYTES tensor truncated inside a length prefix")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise ValueError("BYTES tensor element runs past the end of its data")
        items.append(bytes(view[pos : pos + length]))
        pos += length
    if count is not None and len(items) != count:
        raise ValueError(f"BYTES tensor holds {len(items)} elements, shape needs {count}")
    if pos != end:
        raise ValueError(f"BYTES tensor has {end - pos} bytes after its last element")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def nbytes_of(datatype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Size of a fixed-size tensor's raw data."""
    count = 1
    for dim in shape:
        count *= dim
    return count * element_size(datatype)
