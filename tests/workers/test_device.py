"""Unit tests of workers.device.plan: CPU core sets and GPU assignment."""

from __future__ import annotations

import pytest

from workers import device
from workers.device import Placement, plan


def _plans(workers: int, cpus: list[int], gpus: list[int] | None = None, **kw: object) -> list[Placement]:
    return [plan(i, workers, gpus or [], cpus, **kw) for i in range(workers)]  # type: ignore[arg-type]


def test_four_workers_on_two_cores_share_evenly() -> None:
    plans = _plans(4, [0, 1])
    assert [p.cpus for p in plans] == [[0], [1], [0], [1]]
    assert [p.intra_op_threads for p in plans] == [1, 1, 1, 1]
    assert all(p.gpu is None for p in plans)
    assert [p.label for p in plans] == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]


def test_two_workers_on_eight_cores_get_disjoint_contiguous_halves() -> None:
    plans = _plans(2, list(range(8)))
    assert [p.cpus for p in plans] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [p.intra_op_threads for p in plans] == [4, 4]
    assert plans[0].label == "cpu:0,1,2,3"


@pytest.mark.parametrize(("workers", "cores"), [(1, 1), (3, 8), (5, 16), (7, 7), (3, 2), (16, 5), (6, 4)])
def test_core_sets_are_disjoint_contiguous_and_cover_every_core(workers: int, cores: int) -> None:
    cpus = [10 + 2 * c for c in range(cores)]  # affinity lists need not start at 0 nor be dense
    plans = _plans(workers, cpus)
    sets = min(workers, cores)
    distinct = []
    for p in plans:
        assert p.cpus, "every worker gets at least one core"
        assert p.intra_op_threads == len(p.cpus)
        start = cpus.index(p.cpus[0])
        assert p.cpus == cpus[start : start + len(p.cpus)], "contiguous in the affinity list"
        if p.cpus not in distinct:
            distinct.append(p.cpus)
    assert len(distinct) == sets
    flat = [c for s in distinct for c in s]
    assert sorted(flat) == cpus and len(flat) == len(set(flat)), "disjoint and covering"
    sizes = [len(s) for s in distinct]
    assert max(sizes) - min(sizes) <= 1, "balanced"
    # Workers beyond the number of sets wrap around.
    for i, p in enumerate(plans):
        assert p.cpus == plans[i % sets].cpus


def test_gpus_round_robin() -> None:
    plans = _plans(5, list(range(8)), gpus=[0, 1])
    assert [p.gpu for p in plans] == [0, 1, 0, 1, 0]
    assert all(p.cpus == [] for p in plans)
    assert all(p.intra_op_threads == 1 for p in plans)
    assert [p.label for p in plans[:2]] == ["cuda:0", "cuda:1"]
    odd = _plans(3, [0], gpus=[3, 5, 7, 9])
    assert [p.gpu for p in odd] == [3, 5, 7]


def test_explicit_threads_and_no_pinning() -> None:
    p = plan(1, 2, [], list(range(8)), pin_cpus=False)
    assert p.cpus == []
    assert p.intra_op_threads == 4
    assert p.label == "cpu:all"
    assert plan(0, 2, [], list(range(8)), intra_op_threads=2).intra_op_threads == 2
    assert plan(0, 2, [1], list(range(8)), intra_op_threads=3).intra_op_threads == 3


def test_empty_cpu_list_falls_back_to_core_zero() -> None:
    assert plan(2, 4, [], []).cpus == [0]


def test_gpu_count_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    for hidden in ("", "-1", " "):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert device.detect_gpu_count() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for hidden in ("void", "none", "NONE"):
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", hidden)
        assert device.detect_gpu_count() == 0


def test_available_cpus_is_this_process_affinity() -> None:
    import os

    cpus = device.available_cpus()
    assert cpus == sorted(os.sched_getaffinity(0))
