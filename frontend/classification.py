"""Triton's classification extension: an output asked for with ``parameters.classification = k``
comes back as the top k classes of each row, as BYTES ``"<value>:<index>"`` strings.

Rows are the first dimension when the output has two or more (``[N, C]`` → ``[N, k]``);
a one-dimensional output is one row (``[C]`` → ``[k]``). Values are formatted as Triton
does (six decimals for floating point, integers as they are). Class labels (Triton's
label files) are not kept by this server, so the strings carry no third field.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


class ClassificationError(ValueError):
    """The output cannot be classified (BYTES or BOOL, or empty)."""


def top_k(array: Array, k: int) -> Array:
    """An object array of ``value:index`` bytes, rows by min(k, classes), best first."""
    if array.dtype.kind not in "iuf":
        raise ClassificationError(f"classification needs a numeric output, not {array.dtype}")
    rows = array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(1, -1)
    if rows.shape[1] == 0:
        raise ClassificationError("classification of an output with no classes")
    k = min(k, rows.shape[1])
    # A stable sort on the negated values keeps the lower index first among equal values.
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(rows, order, axis=1)
    floating = array.dtype.kind == "f"
    out = np.empty(order.shape, dtype=object)
    for (r, c), index in np.ndenumerate(order):
        value = values[r, c]
        text = f"{float(value):f}" if floating else str(int(value))
        out[r, c] = f"{text}:{index}".encode()
    return out if array.ndim >= 2 else out.reshape(-1)
