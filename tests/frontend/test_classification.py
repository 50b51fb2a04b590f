"""The classification extension's top-k strings, against a plain numpy ranking."""

from __future__ import annotations

import numpy as np
import pytest

from frontend.classification import ClassificationError, top_k


def test_rows_of_floats_rank_best_first_with_six_decimals() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    got = top_k(scores, 2)
    assert got.shape == (2, 2)
    assert got.tolist() == [[b"0.700000:1", b"0.200000:2"], [b"0.500000:0", b"0.250000:1"]]


def test_k_past_the_class_count_is_clamped_and_ties_keep_the_lower_index() -> None:
    got = top_k(np.array([[3, 3, 1]], dtype=np.int64), 10)
    assert got.tolist() == [[b"3:0", b"3:1", b"1:2"]]


def test_one_dimensional_output_is_one_row_and_extra_dims_are_flattened() -> None:
    assert top_k(np.array([1.0, 4.0, 2.0]), 1).tolist() == [b"4.000000:1"]
    cube = np.zeros((2, 2, 3), dtype=np.float32)
    cube[1, 1, 2] = 9
    got = top_k(cube, 1)
    assert got.shape == (2, 1) and got[1, 0] == b"9.000000:5"


def test_random_rows_match_numpy_argsort() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 10)).astype(np.float32)
    got = top_k(scores, 3)
    for row, classes in zip(scores, got, strict=True):
        indexes = [int(c.split(b":")[1]) for c in classes]
        assert indexes == list(np.argsort(-row)[:3])
        assert [float(c.split(b":")[0]) for c in classes] == pytest.approx(row[indexes], abs=1e-6)


@pytest.mark.parametrize(
    "array", [np.array([[True, False]]), np.array([[b"a"]], dtype=object), np.zeros((2, 0))]
)
def test_what_cannot_be_ranked_is_refused(array: np.ndarray) -> None:
    with pytest.raises(ClassificationError):
        top_k(array, 1)
