"""Which worker takes a request: least busy, except that batched models fill one worker first.

Pure functions over this frontend's view (connections and its own requests in
flight), so the policy is unit-tested without sockets.

Least-busy routing spreads a burst evenly, which is right for an unbatched model
but cuts a batched model's burst into as many small batches as there are
workers. For a model that merges up to ``max_batch_size`` rows, requests go to
the busiest worker that still has less than a batch's worth in flight
(``MODEL_SERVER_BATCH_ROUTING_FILL`` batches), so one worker receives the burst
whole; only past that do they spill to the next.
Ties go to the lowest index, so several frontend processes pick the same
worker for a burst instead of splitting it between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ipc.messages import ModelEntry
from model_server.settings import get_settings


def batch_fill(entry: ModelEntry) -> int:
    """Requests to put on one worker before spreading (0: the model is not batched)."""
    if entry.schema is None or not entry.schema.batched:
        return 0
    settings = get_settings()
    size = entry.config.batching.max_batch_size or settings.max_batch_size
    return int(size * settings.batch_routing_fill) if size > 1 else 0


def order_workers(
    workers: Sequence[int],
    connected: Callable[[int], bool],
    inflight: Callable[[int], int],
    rotation: int,
    fill: int,
) -> list[int]:
    """``workers`` in the order to try them; connected ones first (a disconnect likely means dead).

    ``fill`` 0: fewest in flight first, equal ones rotating so they share the load.
    ``fill`` n: workers with fewer than n in flight, busiest first (lowest index on ties),
    then the rest, least busy first.
    """
    count = len(workers)

    def least_busy(item: tuple[int, int]) -> tuple[bool, int, int]:
        i, w = item
        return (not connected(w), inflight(w), (i - rotation) % count)

    def fill_first(item: tuple[int, int]) -> tuple[bool, bool, int, int]:
        _, w = item
        n = inflight(w)
        filling = n < fill
        return (not connected(w), not filling, -n if filling else n, w)

    key: Callable[[tuple[int, int]], tuple[object, ...]] = fill_first if fill > 1 else least_busy
    return [w for _, w in sorted(enumerate(workers), key=key)]
