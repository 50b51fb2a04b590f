"""Unit and property tests of workers.batching: queue order and caps, merge and split by rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import models
from tests.models import ort_run
from workers.batching import ModelQueue, Pending, Policy, merge, rows_of, signature_of, split
from workers.device import Placement
from workers.runner import ModelRunner

CPU = Placement(gpu=None, cpus=[], intra_op_threads=1)
SIG_A = (("x", "<f4", (3,)),), ()
SIG_B = (("x", "<f4", (4,)),), ()


def _pending(item: int, rows: int, sig: Any = SIG_A, arrival_ns: int = 0) -> Pending[int]:
    return Pending(item, {}, rows, arrival_ns, sig)


# ----------------------------------------------------------------------------- pure helpers


def test_rows_of() -> None:
    assert rows_of({"a": np.zeros((4, 3)), "b": np.zeros(4)}) == 4
    assert rows_of({"a": np.zeros((4, 3)), "b": np.zeros((5, 3))}) == -1
    assert rows_of({"a": np.zeros(())}) == -1
    assert rows_of({"a": np.zeros((0, 3))}) == 0


def test_signature_of() -> None:
    base = signature_of({"x": np.zeros((2, 3), np.float32)}, [])
    assert signature_of({"x": np.zeros((7, 3), np.float32)}, []) == base  # rows do not matter
    assert signature_of({"x": np.zeros((2, 4), np.float32)}, []) != base
    assert signature_of({"x": np.zeros((2, 3), np.float64)}, []) != base
    assert signature_of({"y": np.zeros((2, 3), np.float32)}, []) != base
    assert signature_of({"x": np.zeros((2, 3), np.float32)}, ["scores"]) != base
    two = {"a": np.zeros((1, 2)), "b": np.zeros((1,), np.int64)}
    assert signature_of(two, []) == signature_of(dict(reversed(two.items())), [])


def test_merge_single_is_untouched_and_many_concatenate() -> None:
    one = {"x": np.arange(6).reshape(2, 3)}
    assert merge([one]) is one
    merged = merge([one, {"x": np.arange(3).reshape(1, 3)}])
    assert merged["x"].shape == (3, 3)
    np.testing.assert_array_equal(merged["x"][2], [0, 1, 2])


def test_split_returns_views_by_offsets() -> None:
    out = np.arange(12).reshape(6, 2)
    label = np.arange(6)
    parts = split([out, label], [1, 3, 2])
    assert [p[1].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]
    assert parts[1][0].base is not None  # a view, not a copy
    np.testing.assert_array_equal(parts[2][0], out[4:6])


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros(()), np.zeros((7, 2))])
def test_split_refuses_outputs_without_the_batch_rows(bad: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ValueError, match="is not the batch's 6 rows"):
        split([np.zeros((6, 2)), bad], [2, 4])


# ----------------------------------------------------------------------------- queue


def test_ready_by_rows_preferred_size_and_delay() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(8, 1000, preferred_batch_sizes=(4,)))
    assert not queue.ready(10**12)
    assert queue.due_ns() is None
    queue.pending.append(_pending(0, 2, arrival_ns=100))
    assert not queue.ready(100)
    assert queue.due_ns() == 1100
    assert queue.ready(1100)
    queue.pending.append(_pending(1, 2, arrival_ns=200))
    assert queue.ready(100)  # 4 rows: a preferred size
    queue.pending.append(_pending(2, 4, arrival_ns=300))
    assert queue.rows == 8
    assert queue.ready(100)  # the cap


def test_full() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(8, 0, max_queue_size=2))
    queue.pending.extend([_pending(0, 1), _pending(1, 1)])
    assert queue.full()


def test_oversize_request_runs_alone() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(4, 0))
    queue.pending.extend([_pending(0, 9), _pending(1, 1), _pending(2, 1)])
    assert [p.item for p in queue.take()] == [0]
    assert [p.item for p in queue.take()] == [1, 2]


def test_take_stops_at_a_preferred_size_it_cannot_grow_past() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(16, 0, preferred_batch_sizes=(4, 8)))
    queue.pending.extend([_pending(i, 2) for i in range(3)])
    # 4 rows is a preferred size and the 6 queued rows cannot reach the next one (8): stop at 4.
    assert [p.item for p in queue.take()] == [0, 1]
    queue.pending.extend([_pending(i, 2) for i in range(3, 7)])
    # 2 + 2 + 2 + 2 = 8 is reachable: the batch grows past 4 to 8.
    assert [p.item for p in queue.take()] == [2, 3, 4, 5]
    assert [p.item for p in queue.pending] == [6]


def test_other_signatures_stay_queued_in_order() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(8, 0))
    queue.pending.extend(
        [_pending(0, 1), _pending(1, 1, SIG_B), _pending(2, 1), _pending(3, 1, SIG_B), _pending(4, 1)]
    )
    assert [p.item for p in queue.take()] == [0, 2, 4]
    assert [p.item for p in queue.pending] == [1, 3]
    assert [p.item for p in queue.take()] == [1, 3]


@pytest.mark.parametrize(
    ("queued", "cap", "preferred", "want"),
    [
        (20, 8, (), 8),  # everything queued, capped by rows
        (5, 8, (), 5),  # a short queue takes all of it
        (7, 16, (4, 8), 4),  # 7 can form 4 but not 8
        (12, 16, (4, 8), 8),  # the largest preferred size that fits
        (30, 16, (4, 8, 32), 8),  # 32 is over the cap: never formed
        (3, 16, (4, 8), 3),  # no preferred size formable: what is there
    ],
)
def test_take_cuts_the_largest_formable_preferred_size_else_up_to_the_cap(
    queued: int, cap: int, preferred: tuple[int, ...], want: int
) -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(cap, 10**9, preferred_batch_sizes=preferred))
    queue.pending.extend(_pending(i, 1) for i in range(queued))
    assert [p.item for p in queue.take()] == list(range(want))
    assert [p.item for p in queue.pending] == list(range(want, queued))


def test_delay_applies_only_while_the_queue_is_short() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(4, 1000))
    queue.pending.extend(_pending(i, 1, arrival_ns=0) for i in range(3))
    assert not queue.ready(999)  # 3 of 4 rows: wait for more, until the oldest is due
    assert queue.ready(1000)
    queue.pending.append(_pending(3, 1, arrival_ns=900))
    assert queue.ready(0)  # a full batch runs at once, however recent
    queue.pending.clear()
    queue.pending.extend([_pending(0, 3, SIG_B), _pending(1, 2)])
    assert queue.ready(0)  # 5 rows queued: more than a batch, waiting cannot grow this one


def test_preferred_size_is_ready_only_when_formable_by_one_signature() -> None:
    queue: ModelQueue[int] = ModelQueue(Policy(16, 10**9, preferred_batch_sizes=(4,)))
    queue.pending.extend([_pending(0, 2), _pending(1, 2, SIG_B), _pending(2, 1)])
    assert not queue.ready(0)  # 5 rows, but 2 + 1 of the head's signature: no 4
    queue.pending.append(_pending(3, 1))
    assert queue.ready(0)
    assert [p.item for p in queue.take()] == [0, 2, 3]
    assert [p.item for p in queue.pending] == [1]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    queued=st.integers(1, 80),
    cap=st.integers(1, 40),
    preferred=st.lists(st.integers(1, 48), max_size=4, unique=True),
)
def test_one_row_requests_batch_like_tritons_dynamic_batcher(
    queued: int, cap: int, preferred: list[int]
) -> None:
    """A backlog of one-row requests: ready at once iff a full or preferred batch is there; the
    batch is the largest preferred size that fits, else everything up to the cap."""
    queue: ModelQueue[int] = ModelQueue(Policy(cap, 10**9, preferred_batch_sizes=tuple(sorted(preferred))))
    queue.pending.extend(_pending(i, 1) for i in range(queued))
    available = min(queued, cap)
    formable = [p for p in preferred if p <= available]
    assert queue.ready(0) == (queued >= cap or bool(formable))
    assert queue.ready(10**9)  # the oldest is due: whatever is there runs
    batches = []
    while queue.pending:
        batches.append([p.item for p in queue.take()])
    assert len(batches[0]) == (max(formable) if formable else available)
    assert [i for b in batches for i in b] == list(range(queued)), "order kept, nothing lost"
    assert all(len(b) <= cap for b in batches)


Op = tuple[str, int, int]  # ("arrive", rows, signature) or ("take", 0, 0)

ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 12), st.integers(0, 1)),
        st.tuples(st.just("take"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    cap=st.integers(1, 10),
    preferred=st.lists(st.integers(1, 12), max_size=3, unique=True),
    ops=ops_strategy,
)
def test_take_properties(cap: int, preferred: list[int], ops: list[Op]) -> None:
    """Random arrivals and takes: caps by rows, FIFO start, order kept, every request taken once."""
    sigs = [SIG_A, SIG_B]
    queue: ModelQueue[int] = ModelQueue(Policy(cap, 0, preferred_batch_sizes=tuple(sorted(preferred))))
    rows: dict[int, int] = {}
    sig: dict[int, int] = {}
    taken: list[int] = []
    next_id = 0

    def take() -> None:
        before = [p.item for p in queue.pending]
        batch = [p.item for p in queue.take()]
        after = [p.item for p in queue.pending]
        total = sum(rows[i] for i in batch)
        assert batch, "take returned nothing from a non-empty queue"
        assert batch[0] == before[0], "a batch starts with the oldest queued request"
        assert total <= cap or len(batch) == 1, f"{total} rows > cap {cap} in a merged batch"
        if rows[batch[0]] >= cap:
            assert batch == [batch[0]], "an oversize request runs alone"
        assert all(sig[i] == sig[batch[0]] for i in batch), "signatures mixed"
        assert batch == sorted(batch), "batch members out of arrival order"
        assert after == sorted(after), "queued requests reordered"
        assert sorted(batch + after) == before, "requests lost or duplicated"
        # Same-signature requests are passed over only when they do not fit: an older request of the
        # batch's signature left behind would have pushed the batch past the cap when considered.
        for i in after:
            if sig[i] == sig[batch[0]] and i < batch[-1]:
                earlier = sum(rows[j] for j in batch if j < i)
                assert earlier + rows[i] > cap, f"request {i} overtaken although it fitted"
        if not preferred and rows[batch[0]] < cap:
            # Without preferred sizes a batch is filled greedily: nothing left of its signature fits.
            assert all(total + rows[i] > cap for i in after if sig[i] == sig[batch[0]])
        taken.extend(batch)

    for kind, nrows, s in ops:
        if kind == "arrive":
            rows[next_id], sig[next_id] = nrows, s
            queue.pending.append(_pending(next_id, nrows, sigs[s]))
            next_id += 1
        elif queue.pending:
            take()
    while queue.pending:
        take()
    assert sorted(taken) == list(range(next_id))


# ----------------------------------------------------------------------------- merge/split vs ORT


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelRunner]:
    path = models.linear(tmp_path_factory.mktemp("batching") / "linear.onnx", features=3, seed=3)
    return path, ModelRunner(path, CPU)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    row_counts=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    order_seed=st.integers(0, 2**16),
)
def test_split_of_merge_matches_unbatched_onnxruntime(
    linear_model: tuple[Path, ModelRunner], row_counts: list[int], order_seed: int
) -> None:
    """Each request's slice of one merged run equals onnxruntime on that request alone."""
    path, runner = linear_model
    rng = np.random.default_rng(order_seed)
    requests = [{"x": rng.normal(size=(n, 3)).astype(np.float32)} for n in row_counts]
    order = rng.permutation(len(requests))  # arrival order
    arrived = [requests[i] for i in order]
    merged = merge(arrived)
    assert rows_of(merged) == sum(row_counts)
    outputs = runner.run(merged)
    parts = split(outputs, [rows_of(f) for f in arrived])
    for feeds, (scores, label) in zip(arrived, parts, strict=True):
        want = ort_run(path, feeds)
        assert scores.shape == want["scores"].shape
        np.testing.assert_allclose(scores, want["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(label, want["label"])


def test_merge_split_with_several_input_types(tmp_path: Path) -> None:
    path = models.multi_dtype(tmp_path / "multi.onnx")
    runner = ModelRunner(path, CPU)
    requests: list[dict[str, np.ndarray[Any, Any]]] = []
    for n, seed in ((1, 0), (3, 1), (2, 2)):
        rng = np.random.default_rng(seed)
        requests.append(
            {
                "count": rng.integers(0, 100, size=(n, 1)).astype(np.int64),
                "amount": rng.normal(size=(n, 1)).astype(np.float32),
                "flag": rng.integers(0, 2, size=(n, 1)).astype(np.bool_),
                "tag": np.array([[f"tag-{seed}-{i}-é"] for i in range(n)], dtype=object),
            }
        )
    parts = split(runner.run(merge(requests)), [rows_of(r) for r in requests])
    for feeds, got in zip(requests, parts, strict=True):
        want = ort_run(path, feeds)
        np.testing.assert_allclose(got[0], want["total"])
        np.testing.assert_array_equal(got[1], want["not_flag"])
        assert got[2].tolist() == want["tag_out"].tolist()
