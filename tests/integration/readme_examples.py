"""Running the README's client examples as written against a test server: the examples all
score the demo fraud model on the same two rows and print the probabilities."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

from tests.models import ort_run

README = Path(__file__).resolve().parents[2] / "README.md"
FRAUD_FEEDS = {
    "feature1": np.array([[1.0], [3.0]], np.float32),
    "feature2": np.array([[2.0], [4.0]], np.float32),
}


def printed_numbers(code: str) -> tuple[list[float], str]:
    """Run ``code`` (compiled as README.md) and return the decimals it printed, and the text."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    text = printed.getvalue()
    return [float(v) for v in re.findall(r"\d+\.\d+", text)], text


def fraud_expected(repository: Path) -> np.ndarray:
    """onnxruntime's fraud probability for the examples' two rows."""
    model = repository / "fraud_detection" / "2.0.0" / "model.onnx"
    return np.asarray(ort_run(model, FRAUD_FEEDS)["fraud_probability"][:, 0])
