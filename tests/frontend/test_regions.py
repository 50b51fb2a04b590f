"""Client shared-memory registrations are owned by the coordinator: a frontend process whose
snapshot lags behind a registration made through another frontend still finds the region."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.asyncio

from coordinator.process import CoordinatorProcess
from frontend.call import resolve_region
from frontend.coordinator_client import CoordinatorClient, Table
from frontend.dispatcher import RegionRef
from frontend.errors import ApiError
from ipc.messages import ShmRegion
from model_server.settings import Settings


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(run_dir=tmp_path, cache_dir=tmp_path / "cache", model_repository=tmp_path / "repo")
    stop = threading.Event()
    proc = CoordinatorProcess(settings, stop)
    thread = threading.Thread(target=proc.run, name="coordinator", daemon=True)
    thread.start()
    try:
        yield settings
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_lagging_frontend_asks_the_coordinator_before_saying_not_registered(coordinator: Settings) -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        first = CoordinatorClient(ctx, coordinator.run_dir, timeout_s=5.0)
        second = CoordinatorClient(ctx, coordinator.run_dir, timeout_s=5.0)
        await first.start()
        await second.start()
        try:
            reply = await first.register_region(ShmRegion("frames", "ms_test_frames", 0, 4096))
            assert reply.status == 200, reply.error
            # The second frontend has not received the publish yet (as under load in CI).
            second.table = Table()
            ref = await resolve_region(second, RegionRef("frames", 1024, 2048), "input 'x'")
            assert (ref.segment, ref.offset, ref.nbytes) == ("ms_test_frames", 1024, 2048)
            # A region nobody registered is still a 400, after asking.
            with pytest.raises(ApiError) as missing:
                await resolve_region(second, RegionRef("ghost", 0, 8), "input 'x'")
            assert missing.value.status == 400
            assert "'ghost' is not registered" in missing.value.message
            # A range past the region's end is a 400 naming both sizes.
            with pytest.raises(ApiError) as too_far:
                await resolve_region(second, RegionRef("frames", 4000, 200), "output 'y'")
            assert "offset 4000 + size 200 exceeds" in too_far.value.message
        finally:
            await first.close()
            await second.close()
            ctx.term()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
