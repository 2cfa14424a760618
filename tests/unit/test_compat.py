"""asyncpg's private pool attributes (safepool/_compat.py), on the state core
alone: no event loop, no database."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from safepool import _compat
from safepool._state import PoolState, ReleaseOutcome, Slot


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed


class FakePool:
    """What the view reads of a pool: ``_state`` and ``_now()``."""

    def __init__(self, max_size: int, min_size: int = 0, lifetime: float = 0.0) -> None:
        self._state = PoolState(max_size=max_size, min_size=min_size, max_inactive_lifetime=lifetime)
        self.clock = 0.0

    def _now(self) -> float:
        return self.clock

    def open(self) -> Slot:
        slot = self._state.add_connecting(self.clock)
        self._state.connect_succeeded(slot, FakeConnection(), self.clock)
        self._state.actions.clear()
        return slot

    def close(self, slot: Slot) -> None:
        self._state.discard(slot, self.clock)
        self._state.closed(slot, self.clock)
        self._state.actions.clear()


def cons(pool: Any) -> list[Any]:
    return [holder._con for holder in _compat.holders(pool)]


def test_fixed_positions_and_replacement_in_the_freed_one() -> None:
    pool = FakePool(max_size=3)
    a, b, c = pool.open(), pool.open(), pool.open()
    assert cons(pool) == [a.connection, b.connection, c.connection]
    pool.close(b)
    assert cons(pool) == [a.connection, None, c.connection]
    d = pool.open()
    assert cons(pool) == [a.connection, d.connection, c.connection]
    assert _compat.holders(pool)[1] is _compat.holders(pool)[1]  # same objects, as asyncpg's list


def test_holders_read_live() -> None:
    pool = FakePool(max_size=1)
    holder = _compat.holders(pool)[0]
    assert holder._con is None and not holder.is_connected() and holder._in_use is None
    slot = pool.open()
    assert holder._con is slot.connection and holder.is_connected() and holder.is_idle()


def test_in_use_until_the_reset_is_done_and_queue_size() -> None:
    pool = FakePool(max_size=2)
    state = pool._state
    pool.open()
    pool.open()
    queue = _compat.queue(pool)
    assert queue.qsize() == 2 and queue.full() and queue.maxsize == 2
    lease = state.try_acquire(0.0)
    assert lease is not None
    (holder,) = [h for h in _compat.holders(pool) if h._con is lease.slot.connection]
    assert holder._in_use is not None and not holder._in_use.done() and not holder.is_idle()
    assert queue.qsize() == 1
    assert state.release(lease, 0.0, ReleaseOutcome.NEEDS_RESET)
    assert holder._in_use is not None and queue.qsize() == 1  # the reset is under way
    state.reset_done(lease.slot, 0.0, True)
    assert holder._in_use is None and queue.qsize() == 2


def test_connecting_position_is_not_free() -> None:
    pool = FakePool(max_size=1)
    pool._state.add_connecting(0.0)
    assert cons(pool) == [None]
    assert _compat.queue(pool).qsize() == 0


def test_inactive_callback_while_the_lifetime_runs() -> None:
    pool = FakePool(max_size=1, lifetime=1.0)
    pool.open()
    holder = _compat.holders(pool)[0]
    timer = holder._inactive_callback
    assert timer is not None and timer.when() == 1.0
    pool.clock = 1.0  # ran out: closed by the pool, or kept for min_size (asyncpg: None)
    assert holder._inactive_callback is None
    assert _compat.holders(FakePool(max_size=1))[0]._inactive_callback is None


def test_pool_holder_reads() -> None:
    pool = FakePool(max_size=1)
    slot = pool.open()

    class Holder(_compat.HolderCompat):
        __slots__ = ("_pool", "_slot", "_con")

    holder = Holder()
    holder._pool, holder._slot, holder._con = pool, slot, slot.connection
    assert holder._in_use is None and holder.is_connected()
    lease = pool._state.try_acquire(0.0)
    assert lease is not None and holder._in_use is not None
    pool.close(slot)
    holder._con = None
    assert holder._in_use is None and not holder.is_connected()


def test_view_keeps_no_pool_alive() -> None:
    pool = FakePool(max_size=2)
    pool.open()
    connection = weakref.ref(next(iter(pool._state.slots())).connection)
    assert _compat.holders(pool)[0].is_connected()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None and connection() is None
