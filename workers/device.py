"""Which device a worker runs on: a GPU by index, or a set of CPU cores.

GPU detection must not ask ONNX Runtime for CUDA: the onnxruntime-gpu wheel
lists the CUDA provider even on machines without a GPU, and creating a CUDA
session there logs errors. We look for the NVIDIA driver instead
(``/proc/driver/nvidia/gpus`` and, failing that, the CUDA driver library).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where one worker runs and with how many ONNX Runtime threads."""

    gpu: int | None  # CUDA device_id, or None for the CPU provider
    cpus: list[int] = field(default_factory=list)  # affinity set (empty: leave as is)
    intra_op_threads: int = 1

    @property
    def label(self) -> str:
        if self.gpu is not None:
            return f"cuda:{self.gpu}"
        return "cpu:" + (",".join(map(str, self.cpus)) if self.cpus else "all")


def detect_gpu_count() -> int:
    """Number of NVIDIA GPUs visible to this process (0 when there is no driver).

    The CUDA driver's count honours the container runtime's and CUDA's own
    device visibility; /proc/driver/nvidia/gpus, which may list the host's GPUs,
    is only a fallback when the driver library cannot be loaded.
    """
    # CUDA's and the NVIDIA container runtime's own variables, not settings of ours.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return 0
    if os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower() in {"void", "none"}:
        return 0
    count = _cuda_driver_count()
    if count < 0:
        proc = Path("/proc/driver/nvidia/gpus")
        count = len(list(proc.iterdir())) if proc.is_dir() else 0
        if visible:
            count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def _cuda_driver_count() -> int:
    """GPUs the CUDA driver reports; -1 when the driver library is absent."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return -1
    try:
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0
    except AttributeError:
        return 0


def available_cpus() -> list[int]:
    try:
        return sorted(psutil.Process().cpu_affinity() or [])
    except (AttributeError, psutil.Error):
        return list(range(os.cpu_count() or 1))


def plan(
    index: int,
    workers: int,
    gpu_ids: list[int],
    cpus: list[int],
    pin_cpus: bool = True,
    intra_op_threads: int = 0,
) -> Placement:
    """Placement of worker ``index`` out of ``workers``.

    GPUs: worker i takes ``gpu_ids[i % len(gpu_ids)]`` (several workers may share
    one). CPUs: the cores are split into ``min(workers, cores)`` contiguous sets
    and worker i takes set ``i % sets``, so workers never straddle each other's
    cores when there are enough of them, and share evenly when there are not.
    """
    if gpu_ids:
        threads = intra_op_threads or 1
        return Placement(gpu=gpu_ids[index % len(gpu_ids)], cpus=[], intra_op_threads=threads)
    if not cpus:
        cpus = [0]
    sets = max(1, min(workers, len(cpus)))
    chunk = len(cpus) // sets
    extra = len(cpus) % sets
    slot = index % sets
    start = slot * chunk + min(slot, extra)
    mine = cpus[start : start + chunk + (1 if slot < extra else 0)]
    threads = intra_op_threads or len(mine)
    return Placement(gpu=None, cpus=mine if pin_cpus else [], intra_op_threads=threads)


def apply(placement: Placement) -> None:
    """Pin this process to its CPU set (GPU choice is applied per session)."""
    if placement.cpus:
        try:
            psutil.Process().cpu_affinity(placement.cpus)
        except (AttributeError, psutil.Error) as exc:
            log.warning("could not pin to CPUs %s: %s", placement.cpus, exc)
