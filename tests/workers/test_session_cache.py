"""Unit tests of workers.session_cache: LRU order, budgets, pins and unloads that wait."""

from __future__ import annotations

import threading
import time

import pytest

from workers.session_cache import BudgetExceeded, SessionCache

A, B, C, D = ("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")


def _filled(
    max_models: int = 0, max_bytes: int = 0, sizes: dict[tuple[str, str], int] | None = None
) -> SessionCache[str]:
    cache: SessionCache[str] = SessionCache(max_models=max_models, max_bytes=max_bytes)
    for key, nbytes in (sizes or {A: 10, B: 10, C: 10}).items():
        assert cache.make_room(nbytes, exclude=key) == []
        cache.put(key, f"session-{key[0]}", nbytes)
    return cache


def test_acquire_pins_and_release_unpins() -> None:
    cache = _filled()
    entry = cache.acquire(A)
    assert entry is not None
    assert entry.value == "session-a"
    assert (entry.pins, cache.inflight) == (1, 1)
    again = cache.acquire(A)
    assert again is entry
    assert entry.pins == 2
    cache.release(entry)
    cache.release(entry)
    assert cache.inflight == 0
    assert cache.acquire(("missing", "1")) is None
    assert A in cache
    assert ("missing", "1") not in cache


def test_lru_order_follows_use() -> None:
    cache = _filled()
    assert cache.held() == [A, B, C]
    for key in (A, B):
        entry = cache.acquire(key)
        assert entry is not None
        cache.release(entry)
    assert cache.held() == [C, A, B]


def test_max_models_evicts_least_recently_used() -> None:
    cache = _filled(max_models=3)
    entry = cache.acquire(A)  # A becomes most recent
    assert entry is not None
    cache.release(entry)
    assert cache.make_room(10, exclude=D) == [B]
    cache.put(D, "session-d", 10)
    assert cache.held() == [C, A, D]
    assert cache.evictions == 1
    assert B not in cache


def test_reloading_a_held_key_does_not_evict_others() -> None:
    cache = _filled(max_models=3)
    # ``exclude`` is the key being (re)loaded: it does not count against the budget.
    assert cache.make_room(10, exclude=B) == []
    assert cache.held() == [A, B, C]


def test_byte_budget_evicts_until_it_fits() -> None:
    cache = _filled(max_bytes=100, sizes={A: 30, B: 30, C: 30})
    assert cache.total_bytes == 90
    assert cache.make_room(10, exclude=D) == []
    # 50 more bytes: A and B (least recent) go, C stays.
    assert cache.make_room(50, exclude=D) == [A, B]
    cache.put(D, "session-d", 50)
    assert cache.held() == [C, D]
    assert cache.total_bytes == 80


def test_model_larger_than_the_budget_is_permanent() -> None:
    cache = _filled(max_bytes=100, sizes={A: 30})
    with pytest.raises(BudgetExceeded) as info:
        cache.make_room(101, exclude=D)
    assert info.value.permanent
    assert "MODEL_SERVER_WORKER_MAX_BYTES=100" in str(info.value)
    assert cache.held() == [A]  # nothing evicted for a model that can never fit


def test_pinned_session_is_never_evicted() -> None:
    cache = _filled(max_models=3)
    a = cache.acquire(A)  # a long request on A
    assert a is not None
    for key in (B, C):  # later requests on B and C finish
        entry = cache.acquire(key)
        assert entry is not None
        cache.release(entry)
    assert cache.held() == [A, B, C]  # A is least recently used, but pinned
    assert cache.make_room(10, exclude=D) == [B]
    cache.put(D, "session-d", 10)
    c, d = cache.acquire(C), cache.acquire(D)
    assert c is not None and d is not None
    # Everything pinned: a temporary refusal (503), not a permanent one.
    with pytest.raises(BudgetExceeded) as info:
        cache.make_room(10, exclude=("e", "1"))
    assert not info.value.permanent
    assert cache.held() == [A, C, D]
    cache.release(a)
    assert cache.make_room(10, exclude=("e", "1")) == [A]
    for entry in (c, d):
        cache.release(entry)
    assert cache.inflight == 0


def test_byte_budget_skips_pinned_entries() -> None:
    cache = _filled(max_bytes=30, sizes={A: 10, B: 10, C: 10})
    a = cache.acquire(A)
    assert a is not None
    assert cache.held() == [B, C, A]
    # Needs 10 bytes: B is the least recently used unpinned entry.
    assert cache.make_room(10, exclude=D) == [B]
    cache.release(a)


def test_refused_make_room_evicts_nothing() -> None:
    cache = _filled(max_bytes=30, sizes={A: 10, B: 10, C: 10})
    a, b = cache.acquire(A), cache.acquire(B)
    assert a is not None and b is not None
    assert cache.held() == [C, A, B]
    try:
        # Needs 20 bytes: only C (10 bytes) is unpinned, so the load cannot fit.
        with pytest.raises(BudgetExceeded):
            cache.make_room(20, exclude=D)
        assert cache.held() == [C, A, B]
    finally:
        cache.release(a)
        cache.release(b)


def _remove_in_thread(
    cache: SessionCache[str], key: tuple[str, str], grace_ns: int, timeout: float
) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        result["removed"] = cache.remove(key, grace_ns=grace_ns, timeout=timeout)
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, name="unloader", daemon=True)
    thread.start()
    return thread, result


def _wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.005)


def test_remove_waits_for_close_due_and_inflight_requests() -> None:
    cache = _filled()
    inflight = cache.acquire(A)
    assert inflight is not None
    thread, result = _remove_in_thread(cache, A, grace_ns=0, timeout=10.0)
    _wait_until(lambda: (entry := cache.get(A)) is not None and entry.close_after_ns > 0)
    # Until the serving thread has drained its socket and called close_due, new requests still get in.
    late = cache.acquire(A)
    assert late is not None
    assert cache.next_close_ns() == late.close_after_ns
    assert cache.close_due(time.monotonic_ns()) == 1
    assert cache.next_close_ns() is None
    assert cache.acquire(A) is None  # closing: no new requests
    assert A not in cache
    assert cache.held() == [B, C]
    time.sleep(0.05)
    assert thread.is_alive(), "remove returned while requests were in flight"
    cache.release(inflight)
    time.sleep(0.05)
    assert thread.is_alive(), "remove returned while one request was still in flight"
    cache.release(late)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert result["removed"] is True
    assert cache.get(A) is None
    assert cache.total_bytes == 20


def test_close_due_respects_the_grace_period() -> None:
    cache = _filled()
    thread, result = _remove_in_thread(cache, A, grace_ns=60 * 10**9, timeout=10.0)
    _wait_until(lambda: cache.next_close_ns() is not None)
    due = cache.next_close_ns()
    assert due is not None
    assert cache.close_due(due - 1) == 0
    assert A in cache
    assert cache.close_due(due) == 1
    thread.join(timeout=5)
    assert result["removed"] is True
    assert cache.held() == [B, C]


def test_remove_times_out_and_a_later_call_finishes() -> None:
    cache = _filled()
    entry = cache.acquire(A)
    assert entry is not None
    cache.close_due(time.monotonic_ns())  # nothing asked yet: nothing to close
    assert A in cache
    thread, result = _remove_in_thread(cache, A, grace_ns=0, timeout=0.2)
    _wait_until(lambda: cache.next_close_ns() is not None)
    assert cache.close_due(time.monotonic_ns()) == 1
    thread.join(timeout=5)
    assert result["removed"] is False
    assert cache.get(A) is not None  # stays, closing, while the request runs
    assert A not in cache
    # A closing entry is not evicted either: its memory is still in use.
    assert cache.make_room(10, exclude=D) == []
    cache.release(entry)
    assert cache.remove(A, timeout=1.0) is True
    assert cache.get(A) is None


def test_remove_absent_key() -> None:
    cache = _filled()
    assert cache.remove(D, timeout=0.1) is False


def test_remove_returns_promptly_when_the_entry_is_evicted_during_grace() -> None:
    cache = _filled(max_models=3)
    thread, result = _remove_in_thread(cache, A, grace_ns=10 * 10**9, timeout=1.0)
    _wait_until(lambda: cache.next_close_ns() is not None)
    evicted = cache.make_room(10, exclude=D)
    if A not in evicted:
        # Also acceptable: an entry being unloaded is left for its unload to finish.
        assert A in cache
        assert cache.close_due(time.monotonic_ns() + 11 * 10**9) == 1
    thread.join(timeout=5)
    assert result["removed"] is (A not in evicted)
    assert result["elapsed"] < 0.5  # type: ignore[operator]
