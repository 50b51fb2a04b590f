"""The frontend's view of the coordinator: requests over a DEALER, the table over a SUB.

The frontend keeps no truth of its own about models: it routes by the latest
``TableSnapshot`` the coordinator published, and asks the coordinator for
anything that changes the table (load, unload, ensure). Both sockets belong to
the event loop of this frontend process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from ipc import endpoints
from ipc.messages import (
    ClientGet,
    ClientIndex,
    ClientLookup,
    ClientReply,
    ClientRequest,
    ClientShmRegister,
    ClientShmUnregister,
    ModelEntry,
    ShmRegion,
    TableSnapshot,
    WorkerState,
    client_inbound_decoder,
    encode,
    table_decoder,
)
from model_server.naming import version_key

log = logging.getLogger(__name__)


class CoordinatorUnavailable(Exception):
    """No answer from the coordinator in time."""


class Table:
    """Indexes over one snapshot, rebuilt when a newer one arrives."""

    def __init__(self, snapshot: TableSnapshot | None = None) -> None:
        self.snapshot = snapshot
        entries = snapshot.models if snapshot else []
        self.models: dict[tuple[str, str], ModelEntry] = {(e.model_id, e.version): e for e in entries}
        self.workers: dict[int, WorkerState] = {w.index: w for w in snapshot.workers} if snapshot else {}
        self.regions: dict[str, ShmRegion] = {r.name: r for r in snapshot.regions} if snapshot else {}
        # Built once per snapshot so a request naming no version is one dict lookup. The sorts
        # are stable, so of two versions that compare equal the one listed first wins.
        self.named: dict[str, ModelEntry] = {}  # any version per name (the lowest), for a state to report
        for entry in sorted(entries, key=lambda e: version_key(e.version)):
            self.named.setdefault(entry.model_id, entry)
        self.latest: dict[str, ModelEntry] = {}  # newest ready version per name
        for entry in sorted(entries, key=lambda e: version_key(e.version), reverse=True):
            if entry.state == "ready":
                self.latest.setdefault(entry.model_id, entry)


class CoordinatorClient:
    def __init__(self, ctx: zmq.asyncio.Context, run_dir: Any, timeout_s: float) -> None:
        self.ctx = ctx
        self.run_dir = run_dir
        self.timeout_s = timeout_s
        self.table = Table()
        self._pending: dict[int, asyncio.Future[ClientReply]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        # Called with each new table (the dispatcher connects to new workers).
        self.on_table: Callable[[Table], None] | None = None
        self.dealer: zmq.asyncio.Socket | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self._sub_now: zmq.Socket[bytes] | None = None

    async def start(self) -> None:
        self.dealer = endpoints.configure(self.ctx.socket(zmq.DEALER), linger_ms=0)
        self.dealer.connect(endpoints.coordinator_endpoint(self.run_dir))
        self.sub = endpoints.configure(self.ctx.socket(zmq.SUB), linger_ms=0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        # Only the newest snapshot matters; older ones queued behind it are stale.
        self.sub.setsockopt(zmq.CONFLATE, 1)
        self.sub.connect(endpoints.events_endpoint(self.run_dir))
        # The same socket for reads that must not wait (catch_up); the loop's reader task owns it
        # otherwise, and both run on this event loop's thread.
        self._sub_now = zmq.Socket.shadow(self.sub.underlying)
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="coordinator-replies"),
            asyncio.create_task(self._read_table(), name="coordinator-table"),
        ]
        with contextlib.suppress(CoordinatorUnavailable):
            await self.refresh()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CoordinatorUnavailable("frontend is shutting down"))
        self._sub_now = None  # a shadow: it does not own the socket closed below
        for sock in (self.dealer, self.sub):
            if sock is not None:
                sock.close(linger=0)

    def _apply(self, snapshot: TableSnapshot) -> None:
        if self.table.snapshot is not None and snapshot.epoch < self.table.snapshot.epoch:
            return  # an older snapshot overtaken by a newer one
        self.table = Table(snapshot)
        if self.on_table is not None:
            self.on_table(self.table)

    def _apply_payload(self, payload: bytes) -> None:
        try:
            self._apply(table_decoder.decode(payload))
        except Exception as exc:
            log.error("bad table snapshot: %s", exc)

    async def _read_table(self) -> None:
        assert self.sub is not None
        while True:
            self._apply_payload(await self.sub.recv())

    def catch_up(self) -> None:
        """Apply a table already published but not read yet by this loop (which may have the
        client's next request ready in the same iteration): no waiting, a few µs."""
        sub = self._sub_now
        if sub is None or sub.closed:
            return
        while True:
            try:
                payload = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply_payload(payload)

    async def _read_replies(self) -> None:
        assert self.dealer is not None
        while True:
            payload = await self.dealer.recv()
            try:
                msg = client_inbound_decoder.decode(payload)
            except Exception as exc:
                log.error("bad coordinator reply: %s", exc)
                continue
            if isinstance(msg, TableSnapshot):
                self._apply(msg)
                continue
            fut = self._pending.pop(msg.req, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            if msg.table is not None:
                self._apply(msg.table)

    async def request(
        self, kind: Callable[..., ClientRequest], *args: Any, timeout: float | None = None
    ) -> ClientReply:
        """Send ``kind(req_id, *args)`` and wait for its reply."""
        assert self.dealer is not None
        req = next(self._ids)
        fut: asyncio.Future[ClientReply] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        timeout = timeout or self.timeout_s
        try:
            await self.dealer.send(encode(kind(req, *args)))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CoordinatorUnavailable(f"the coordinator did not answer within {timeout:.1f} s") from None
        finally:
            self._pending.pop(req, None)

    async def refresh(self, timeout: float | None = None) -> ClientReply:
        return await self.request(ClientGet, timeout=timeout)

    async def lookup(self, model_id: str, version: str | None) -> ClientReply:
        """One model's entry from the coordinator (404 without the table when unknown)."""
        return await self.request(ClientLookup, model_id, version or "")

    async def index(self) -> ClientReply:
        return await self.request(ClientIndex)

    async def register_region(self, region: ShmRegion) -> ClientReply:
        return await self.request(ClientShmRegister, region)

    async def unregister_region(self, name: str) -> ClientReply:
        return await self.request(ClientShmUnregister, name)
