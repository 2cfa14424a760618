"""asyncpg's private pool attributes: kept for compatibility, not API.

asyncpg's pool keeps ``max_size`` ``PoolConnectionHolder`` objects in
``pool._holders`` and the ones not in use in the LIFO queue ``pool._queue``.
asyncpg's own test suite and some monitoring code read them:
``pool._holders[i]._con``, ``holder._in_use``, ``holder.is_connected()``,
``holder._inactive_callback``, ``pool._queue.qsize()``.

safepool keeps its books differently (``_state.py``: one :class:`Slot` per
server connection, created and dropped as connections come and go), so this
module answers those reads from the state core, with asyncpg's meaning:

- ``pool._holders``: a tuple of ``max_size`` holders at fixed positions. A
  connection keeps its position while it is open; a new one (being opened)
  takes the lowest free position, so a connection replacing a lost one lands
  where its predecessor was.
- ``holder._con``: the asyncpg connection, or None while the position has no
  open connection (empty, connecting, or its connection is being closed).
- ``holder._in_use``: not None from acquire until the release's reset is
  done, None otherwise. asyncpg puts a future there; safepool a marker that
  cannot be awaited.
- ``holder._inactive_callback``: not None while the connection sits idle
  and ``max_inactive_connection_lifetime`` has not run out (``when()`` gives
  the deadline on the pool's clock); None otherwise, as with asyncpg once the
  timer fired for a connection kept for ``min_size``.
- ``holder.is_connected()`` / ``holder.is_idle()``: as in asyncpg.
- ``pool._queue``: ``qsize()`` is the number of holders neither in use nor
  connecting (``max_size`` minus those); ``maxsize``, ``empty()``, ``full()``;
  ``_getters``, the futures of the tasks waiting for a connection.

Everything is read-only and computed at the time of each read; nothing here
changes the pool. The supported way to watch a pool is ``pool.stats()`` and
``pool.leases()``.
"""

from __future__ import annotations

import weakref
from typing import Any

from ._state import PoolState, Slot, SlotState

S = SlotState
# States that hold a position in ``_holders`` (a connection open or opening).
_PLACED = frozenset({S.CONNECTING, S.IDLE, S.RESERVED, S.LEASED, S.RESETTING})
# States in which asyncpg's holder has a connection (``_con`` not None).
_OPEN = frozenset({S.IDLE, S.RESERVED, S.LEASED, S.RESETTING})
# States in which asyncpg's holder is out of the queue with ``_in_use`` set.
_IN_USE = frozenset({S.RESERVED, S.LEASED, S.RESETTING})


class InUse:
    """What ``holder._in_use`` holds while the connection is in use.

    asyncpg puts a future there that its pool resolves on release; this
    marker is truthy, ``done()`` is False, and it cannot be awaited."""

    __slots__ = ("state",)

    def __init__(self, state: SlotState) -> None:
        self.state = state

    def done(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<safepool in use: {self.state.value}>"


_IN_USE_MARKS = {state: InUse(state) for state in _IN_USE}


class InactiveTimer:
    """What ``holder._inactive_callback`` holds while an idle connection's
    ``max_inactive_connection_lifetime`` runs (asyncpg: a ``TimerHandle``)."""

    __slots__ = ("_when",)

    def __init__(self, when: float) -> None:
        self._when = when

    def when(self) -> float:
        return self._when

    def cancelled(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<safepool inactive timer when={self._when:.3f}>"


def _in_use(slot: Slot | None) -> InUse | None:
    if slot is None:
        return None
    return _IN_USE_MARKS.get(slot.state)


def _inactive_timer(slot: Slot | None, state: PoolState, now: float) -> InactiveTimer | None:
    lifetime = state.max_inactive_lifetime
    if slot is None or slot.state is not S.IDLE or not lifetime:
        return None
    when = slot.idle_since + lifetime
    return InactiveTimer(when) if now < when else None


class _Positions:
    """One pool's slot -> position map, kept across reads.

    Refers to the pool weakly and to slots by id only: a dropped pool and its
    connections must be garbage together, as with asyncpg (whose tests check
    that a collected pool's connections are collected with it)."""

    __slots__ = ("pool", "by_id", "holders", "__weakref__")

    def __init__(self, pool: Any) -> None:
        self.pool = weakref.ref(pool)
        self.by_id: dict[int, int] = {}  # slot id -> position
        self.holders: list[HolderView] = []

    def state(self) -> PoolState | None:
        pool = self.pool()
        return None if pool is None else pool._state

    def now(self) -> float:
        pool = self.pool()
        return 0.0 if pool is None else float(pool._now())

    def refresh(self) -> dict[int, Slot]:
        """Place new slots, free the positions of closing ones; position -> slot."""
        state = self.state()
        if state is None:
            return {}
        placed = [slot for slot in state.slots() if slot.state in _PLACED]
        old = self.by_id
        by_id = {slot.id: old[slot.id] for slot in placed if slot.id in old}
        if len(by_id) < len(placed):
            taken = set(by_id.values())
            free = 0
            for slot in sorted((s for s in placed if s.id not in by_id), key=lambda s: s.id):
                while free in taken:
                    free += 1
                by_id[slot.id] = free
                taken.add(free)
        self.by_id = by_id
        size = max(state.max_size, max(by_id.values(), default=-1) + 1)
        while len(self.holders) < size:
            self.holders.append(HolderView(self, len(self.holders)))
        return {by_id[slot.id]: slot for slot in placed}

    def slot_at(self, position: int) -> Slot | None:
        return self.refresh().get(position)


class HolderView:
    """One position of ``pool._holders``, read live (see the module note)."""

    __slots__ = ("_positions", "_position")

    def __init__(self, positions: _Positions, position: int) -> None:
        self._positions = positions
        self._position = position

    @property
    def _con(self) -> Any:
        slot = self._positions.slot_at(self._position)
        if slot is None or slot.state not in _OPEN:
            return None
        return slot.connection

    @property
    def _in_use(self) -> InUse | None:
        return _in_use(self._positions.slot_at(self._position))

    @property
    def _inactive_callback(self) -> InactiveTimer | None:
        positions = self._positions
        state = positions.state()
        if state is None:
            return None
        return _inactive_timer(positions.slot_at(self._position), state, positions.now())

    def is_connected(self) -> bool:
        con = self._con
        return con is not None and not con.is_closed()

    def is_idle(self) -> bool:
        return not self._in_use

    def __repr__(self) -> str:
        slot = self._positions.slot_at(self._position)
        what = "empty" if slot is None else slot.state.value
        return f"<safepool holder view {self._position}: {what}>"


class QueueView:
    """``pool._queue``: asyncpg's queue of holders not in use, counted."""

    __slots__ = ("_positions",)

    def __init__(self, positions: _Positions) -> None:
        self._positions = positions

    @property
    def maxsize(self) -> int:
        state = self._positions.state()
        return 0 if state is None else state.max_size

    def qsize(self) -> int:
        slots = self._positions.refresh()
        busy = sum(1 for slot in slots.values() if slot.state is not S.IDLE)
        return max(0, len(self._positions.holders) - busy)

    @property
    def _getters(self) -> tuple[Any, ...]:
        # The futures of the tasks waiting for a connection: health checks
        # count them, len(pool._queue._getters), as asyncpg's queue's getters.
        state = self._positions.state()
        return () if state is None else tuple(state.waiting_futures())

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self.maxsize

    def __repr__(self) -> str:
        return f"<safepool queue view qsize={self.qsize()} maxsize={self.maxsize}>"


# Keyed weakly by pool; a _Positions refers to its pool weakly and holds no
# slot or connection, so a dropped pool is collected as without the view.
_POSITIONS: weakref.WeakKeyDictionary[Any, _Positions] = weakref.WeakKeyDictionary()


def _positions(pool: Any) -> _Positions:
    positions = _POSITIONS.get(pool)
    if positions is None:
        positions = _POSITIONS[pool] = _Positions(pool)
    return positions


def holders(pool: Any) -> tuple[HolderView, ...]:
    """``pool._holders``: asyncpg's holders, one per position."""
    positions = _positions(pool)
    positions.refresh()
    return tuple(positions.holders)


def queue(pool: Any) -> QueueView:
    """``pool._queue``: asyncpg's queue of free holders (``qsize()``)."""
    return QueueView(_positions(pool))


class HolderCompat:
    """asyncpg's holder reads on the pool's per-connection holder (the
    ``proxy._holder`` of a leased connection), which has ``_pool``, ``_slot``
    and ``_con`` of its own."""

    __slots__ = ()

    @property
    def _in_use(self) -> InUse | None:
        slot: Slot = self._slot  # type: ignore[attr-defined]
        return _in_use(slot)

    @property
    def _inactive_callback(self) -> InactiveTimer | None:
        pool = self._pool  # type: ignore[attr-defined]
        return _inactive_timer(self._slot, pool._state, pool._now())  # type: ignore[attr-defined]

    def is_connected(self) -> bool:
        con = self._con  # type: ignore[attr-defined]
        return con is not None and not con.is_closed()

    def is_idle(self) -> bool:
        return not self._in_use
