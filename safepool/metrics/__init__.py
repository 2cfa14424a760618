"""Exporters for safepool's statistics: Prometheus (:mod:`safepool.metrics.prometheus`)
and OpenTelemetry (:mod:`safepool.metrics.otel`).

Both read :meth:`safepool.Pool.stats` when the metrics are collected, so a pool
pays nothing between scrapes. This module holds what they share: the set of
pools an exporter reports on, and a snapshot taken on the pool's event loop
(prometheus_client's HTTP server and OpenTelemetry's periodic reader both
collect off the loop's thread; :meth:`safepool.Pool.call_threadsafe` runs the
read on the loop and waits for it). Exporters use the pool's public surface
only (docs/api.md, "Observing a pool").
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import PoolTypeError, PoolValueError, check_encodable, check_flag, check_is_pool, pool_list
from ..stats import PoolStats

if TYPE_CHECKING:
    from ..pool import Pool

__all__ = ["PoolSet", "leak_suspects", "pool_list", "read", "snapshot"]


class PoolSet:
    """The pools an exporter reports on, each under a unique name.

    Registered pools are held weakly: a pool that is garbage collected drops
    out. With ``live=True`` every pool of the process that is still open is
    reported too (see :func:`safepool.pool.live_pools`), so an application
    does not have to register each one. Closed pools are never reported.
    """

    def __init__(self, pools: Iterable[Pool] = (), *, live: bool = False) -> None:
        self.live = check_flag("live", live)  # (live="no", truthy, reported every pool)
        self._named: dict[str, weakref.ref[Pool]] = {}
        # live: the pool each shared name went to (see items()).
        self._bare: dict[str, weakref.ref[Pool]] = {}
        # live: pools remove() took out, until add() puts them back.
        self._removed: weakref.WeakSet[Pool] = weakref.WeakSet()
        self.add_all(pools)

    def add_all(self, pools: Iterable[Pool]) -> None:
        """Report on each of ``pools`` under its name, or on none of them:
        they are added to a copy of the set, kept only if every name fits
        (against the pools reported and each other), so a clash leaves the
        set as it was.

        :raises ValueError: as :meth:`add`, for the first pool that clashes.
        :raises TypeError: as :meth:`add`, for the first that is not a pool,
            or ``pools`` is one pool."""
        pools = pool_list(pools)
        named, removed = self._named, self._removed
        self._named, self._removed = dict(named), weakref.WeakSet(removed)  # (a trial run on copies)
        try:
            for pool in pools:
                self.add(pool)
        except (ValueError, TypeError):
            self._named, self._removed = named, removed
            raise

    def add(self, pool: Pool, name: str | None = None) -> str:
        """Report on ``pool`` under ``name`` (default: ``pool.name``, or the
        name it is reported under already). A pool is reported under one
        name: a new one replaces the old.

        A name may be reused once its pool is closed or gone (an application
        that re-creates its pool); otherwise a duplicate raises ValueError,
        since two time series with the same labels would be rejected by
        Prometheus and merged by OpenTelemetry. With ``live``, the open pool
        reported under the bare ``name`` at the last :meth:`items` (an
        unregistered pool of the process) holds it as a registered one does.

        :returns: the name ``pool`` is reported under.
        :raises ValueError: another open pool is reported under ``name``
            (registered, or with ``live`` the live pool reported under it);
            ``name`` is empty, or UTF-8 cannot encode it (a lone surrogate).
        :raises TypeError: ``name`` is not a str, or ``pool`` not a safepool pool."""
        check_is_pool(pool, "the metrics exporter")
        reported = self.name_of(pool)
        if name is None:
            if reported is not None:
                return reported  # reported already (under this name or another): a no-op
            name = pool.name
        if not isinstance(name, str):
            # Taken, it failed every later scrape (a label value must be a str).
            raise PoolTypeError(f"a pool's metrics name must be a str, got {type(name).__name__}")
        if not name:
            raise PoolValueError("a pool's metrics name must not be empty")
        check_encodable("a pool's metrics name", name)  # (a lone surrogate failed every scrape: review h262)
        taken = self._named.get(name)
        current = taken() if taken is not None else None
        if current is None or _closed(current):
            # live: the pool that was reported under the bare name keeps it
            # while open. Taken over by a registered pool, the series would
            # jump to that pool's counts (a Prometheus counter falling) and,
            # with OpenTelemetry, carry the first pool's on while it is also
            # reported whole as name@<hex id> (review h262).
            current = self._bare_holder(name)
        if current is not None and current is not pool and not _closed(current):
            raise PoolValueError(
                f"cannot report pool {name!r}: another open pool is already reported as {name!r} "
                "(give the pools distinct names with create_pool(name=...), or report this one "
                "under another name with add(pool, name))"
            )
        if reported is not None and reported != name:
            # One name per pool: a second series would count it twice in every sum.
            del self._named[reported]
        self._named[name] = weakref.ref(pool)
        self._removed.discard(pool)
        return name

    def _bare_holder(self, name: str) -> Pool | None:
        """live: the open pool the last :meth:`items` reported under the
        bare ``name`` and that would be again (not removed, not registered
        under another name since), or None."""
        if not self.live:
            return None
        holder = _ref(self._bare.get(name))
        if holder is None or _closed(holder) or holder in self._removed or self.name_of(holder) is not None:
            return None
        return holder

    def name_of(self, pool: Pool) -> str | None:
        """The name ``pool`` is reported under (None: it is not registered)."""
        return next((name for name, ref in self._named.items() if ref() is pool), None)

    def get(self, name: str) -> Pool | None:
        """The pool reported under ``name``: the open pool registered under
        it, else with ``live`` the live pool reported under it (as the next
        :meth:`items` would), else a closed pool still registered under it;
        None if unknown or gone. (A closed registered pool gives its name up
        to a live namesake: that one is what the name reports.)"""
        ref = self._named.get(name)
        registered = ref() if ref is not None else None
        if registered is not None and not _closed(registered):
            return registered
        if self.live:
            live = next((pool for reported, pool in self.items() if reported == name), None)
            if live is not None:
                return live
        return registered

    def remove(self, pool_or_name: Pool | str) -> list[Pool]:
        """Stop reporting on a pool (given by name or object), live mode
        included, until it is added again; unknown ones are ignored. By
        name: the pool :meth:`get` answers (the one reported under it), and
        the registration of that name (a closed pool's too).

        :returns: the pools taken out (0, 1 or 2: by name, the live pool
            reported under it and the closed one registered under it)."""
        removed: list[Pool] = []
        if isinstance(pool_or_name, str):
            pool = self.get(pool_or_name)  # (before the registration goes: else a namesake could take the name)
            ref = self._named.pop(pool_or_name, None)
            registered = ref() if ref is not None else None
            if registered is not None and registered is not pool:
                removed.append(registered)
        else:
            pool = pool_or_name
        if pool is None:
            return removed
        for name, ref in list(self._named.items()):
            if ref() is pool:
                del self._named[name]
        self._removed.add(pool)
        removed.append(pool)
        return removed

    def items(self) -> list[tuple[str, Pool]]:
        """(name, pool) for every open pool to report, names unique."""
        result: list[tuple[str, Pool]] = []
        seen: set[int] = set()
        for name, ref in list(self._named.items()):
            pool = ref()
            if pool is None:
                self._named.pop(name, None)
                continue
            seen.add(id(pool))
            if not _closed(pool):
                result.append((name, pool))
        if self.live:
            from ..pool import live_pools

            names = {name for name, _ in result}  # (a closed registered pool gives its name up, as add() lets it)
            bare = self._bare
            # The pool a shared name went to keeps it, whatever the order of
            # the live set (it changes as pools are created): else the series
            # would jump from one pool's counters to the other's. Recorded
            # for every pool that takes a bare name, each pass afresh (the
            # names of closed pools drop out: a closed holder frees its name).
            holders: dict[str, weakref.ref[Pool]] = {}
            for pool in sorted(live_pools(), key=lambda p: (p.name, _ref(bare.get(p.name)) is not p)):
                if id(pool) in seen or _closed(pool) or pool in self._removed:
                    continue
                name = pool.name
                if name in names:
                    name = f"{name}@{id(pool):x}"  # two open pools share a name: keep both series apart
                else:
                    holders[name] = weakref.ref(pool)
                names.add(name)
                result.append((name, pool))
            self._bare = holders
        return result


def _closed(pool: Pool) -> bool:
    return pool.closed


def _ref(ref: weakref.ref[Pool] | None) -> Pool | None:
    return None if ref is None else ref()


# How long a collection waits for a pool's event loop to take the snapshot:
# a loop blocked longer fails the collection (an alert in itself) rather
# than reporting numbers read while the loop changes them.
SNAPSHOT_TIMEOUT = 5.0


def snapshot(pool: Pool) -> PoolStats:
    """``pool.stats()``, from any thread: taken on the pool's event loop.

    :raises safepool.PoolTimeoutError: (a ``TimeoutError``) the loop did
        not answer within ``SNAPSHOT_TIMEOUT`` (5.0) seconds."""
    return pool.stats_threadsafe(SNAPSHOT_TIMEOUT)


def leak_suspects(pool: Pool) -> int | None:
    """Leases held longer than the pool's ``leak_warning_after`` now (None
    when that option is off), from any thread. O(leases), no stack formatting.

    :raises TimeoutError: as :func:`snapshot`."""
    return pool.call_threadsafe(lambda: _count_suspects(pool), SNAPSHOT_TIMEOUT)


def read(pool: Pool) -> tuple[PoolStats, int | None]:
    """:func:`snapshot` and :func:`leak_suspects` of one moment, in one trip
    to the pool's loop: ``(stats, leak suspects or None)``.

    :raises TimeoutError: as :func:`snapshot`."""
    return pool.call_threadsafe(lambda: (pool.stats(), _count_suspects(pool)), SNAPSHOT_TIMEOUT)


def _count_suspects(pool: Pool) -> int | None:
    threshold = pool.options.leak_warning_after
    if threshold is None:
        return None
    return sum(1 for info in pool.leases(stacks=False) if info.age >= threshold)
