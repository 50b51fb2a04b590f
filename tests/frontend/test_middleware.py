"""The request-context middleware's body deadline: one timer per body, armed only while it is read.

Driven through the ASGI interface with a receive that hands out chunks at the
test's pace (the real-stack 408 is in tests/integration/test_edge.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from frontend.middleware import BodyTimeout, RequestContextMiddleware

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/v2/models/m/infer",
    "headers": [(b"content-length", b"6")],
}


def _receive_from(queue: asyncio.Queue[Message]) -> Receive:
    async def receive() -> Message:
        return await queue.get()

    return receive


async def _run(app: Any, queue: asyncio.Queue[Message], timeout_s: float) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = RequestContextMiddleware(
        app, max_body_bytes=1024, access_log=False, body_timeout_s=timeout_s
    )
    await middleware(dict(SCOPE), _receive_from(queue), send)
    return sent


def test_a_body_that_stalls_times_out_and_every_later_read_fails() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        for _ in range(2):
            try:
                await receive()
            except BodyTimeout as exc:
                seen.append(exc.status)
        await send({"type": "http.response.start", "status": 408, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> list[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait({"type": "http.request", "body": b"abc", "more_body": True})
        return await asyncio.wait_for(_run(app, queue, timeout_s=0.05), 10)

    sent = asyncio.run(main())
    assert seen[0]["body"] == b"abc" and seen[1:] == [408, 408]
    # The connection goes with the answer: the rest of the body will never be read.
    assert (b"connection", b"close") in sent[0]["headers"]


def test_a_body_read_in_time_leaves_no_timer_and_keeps_the_connection() -> None:
    exchanges: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        exchanges.append(receive.__self__)  # type: ignore[attr-defined]
        second = await receive()
        body = first["body"] + second["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main() -> list[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait({"type": "http.request", "body": b"abc", "more_body": True})
        asyncio.get_running_loop().call_later(
            0.01, queue.put_nowait, {"type": "http.request", "body": b"def"}
        )
        return await asyncio.wait_for(_run(app, queue, timeout_s=30), 10)

    sent = asyncio.run(main())
    assert sent[1]["body"] == b"abcdef"
    assert (b"connection", b"close") not in sent[0]["headers"]
    assert exchanges[0].timer is None and exchanges[0].body_done


def test_a_cancel_from_elsewhere_is_not_taken_for_a_timeout() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await receive()  # never answered: cancelled by the test

    async def main() -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait({"type": "http.request", "body": b"abc", "more_body": True})
        task = asyncio.ensure_future(_run(app, queue, timeout_s=30))
        for _ in range(100):  # bounded: until the app waits for the rest of the body
            await asyncio.sleep(0)
            if queue.empty() and not task.done():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
