"""A fixed-bucket histogram: O(1) memory, O(log buckets) per record."""

from __future__ import annotations

import asyncio
import traceback
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from . import _secrets
from ._logging import guarded_logger
from .errors import refuse_awaitable

# Upper bounds in seconds, roughly x2.5 apart, from 10 µs to 5 minutes:
# fine enough for a p99 an operator can act on, few enough to export as a
# Prometheus histogram without a cardinality cost.
DEFAULT_BOUNDS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A snapshot of a histogram (``PoolStats.acquire_wait``,
    ``lease_duration``, ``connect_time``: values in seconds).

    ``count`` values recorded, their ``sum`` and ``max`` (0.0 with none).
    ``p50``, ``p90`` and ``p99`` are the upper bound of the bucket holding
    that quantile, capped at ``max`` (an over-estimate by at most one
    bucket; 0.0 with no values). ``bounds`` are the buckets' upper bounds,
    ascending (seconds: 10 µs to 300 s); ``bucket_counts`` has one count
    per bound (values ``<= bound`` and above the previous one, not
    cumulative) plus a last one for larger values (+Inf), as a Prometheus
    histogram's ``le`` buckets before they are summed. Its ``repr()``
    leaves the buckets out (45 numbers each, which made
    ``print(pool.stats())`` one line of some 3,000 characters); they
    compare and read as any field."""

    count: int
    sum: float
    max: float
    p50: float
    p90: float
    p99: float
    bounds: tuple[float, ...] = field(repr=False)
    bucket_counts: tuple[int, ...] = field(repr=False)  # one per bound, plus one for +Inf


class Histogram:
    """Counts per bucket, with the count, sum and max of the values.

    :meth:`record` files a value at once. The pool's hot path files lazily
    instead, with no Python call per value: it bumps ``zeros`` (a value of
    0.0, an acquire that did not wait) or appends to ``pending`` and calls
    :meth:`fold` once ``pending`` holds ``FOLD_AT`` values; every read folds
    first, so readers see every value filed either way."""

    __slots__ = ("_bounds", "_counts", "_count", "_sum", "_max", "zeros", "pending")

    # Values held back at most (bounded memory: 256 floats).
    FOLD_AT = 256

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._count = 0
        self._sum = 0.0
        self._max = 0.0
        self.zeros = 0
        self.pending: list[float] = []

    def record(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._count += 1
        self._sum += value
        if value > self._max:
            self._max = value

    def fold(self) -> None:
        """File the values the hot path held back (``zeros``, ``pending``)."""
        if self.zeros:
            zeros, self.zeros = self.zeros, 0
            self._counts[0] += zeros
            self._count += zeros
        pending = self.pending
        if pending:
            self.pending = []  # (swapped, not cleared: what is filed below is this list's alone)
            counts = self._counts
            # One bisect per value in C (map), then one update per bucket hit.
            for index, hits in Counter(map(partial(bisect_left, self._bounds), pending)).items():
                counts[index] += hits
            self._count += len(pending)
            self._sum += sum(pending)
            self._max = max(self._max, max(pending))

    @property
    def count(self) -> int:
        self.fold()
        return self._count

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def max(self) -> float:
        self.fold()
        return self._max

    def quantile(self, q: float) -> float:
        self.fold()
        if self._count == 0:
            return 0.0
        rank = q * self._count
        seen = 0
        for index, bucket in enumerate(self._counts):
            seen += bucket
            if seen >= rank:
                # The +Inf bucket has no bound: the largest value seen is the best answer.
                return min(self._bounds[index], self._max) if index < len(self._bounds) else self._max
        return self._max

    def _quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Several quantiles (ascending) in one pass over the buckets."""
        answers: list[float] = []
        if self._count == 0:
            return [0.0] * len(qs)
        bounds, last = self._bounds, len(self._bounds)
        seen = 0
        pending = iter(qs)
        rank = next(pending) * self._count
        for index, bucket in enumerate(self._counts):
            seen += bucket
            while seen >= rank:
                answers.append(min(bounds[index], self._max) if index < last else self._max)
                try:
                    rank = next(pending) * self._count
                except StopIteration:
                    return answers
        answers.extend([self._max] * (len(qs) - len(answers)))
        return answers

    def snapshot(self) -> Distribution:
        self.fold()
        p50, p90, p99 = self._quantiles((0.5, 0.9, 0.99))
        return Distribution(
            count=self._count,
            sum=self._sum,
            max=self._max,
            p50=p50,
            p90=p90,
            p99=p99,
            bounds=self._bounds,
            bucket_counts=tuple(self._counts),
        )


class TeeHistogram(Histogram):
    """Stands in for one of a pool's histograms while timing sinks are
    attached (``Pool.add_timing_sink``): records into the inner histogram and
    queues the value; the sinks get the queued values in a loop callback of
    their own, after the books have settled (never inside the pool's state
    transitions: a sink may call into the pool). Installed and removed by the
    pool on its loop thread, so no value is lost across the swap."""

    __slots__ = ("inner", "sinks", "_what", "_pool", "_complained", "_loop", "_queued", "_redact")

    def __init__(
        self, inner: Histogram, loop: asyncio.AbstractEventLoop, what: str = "a timing sink", pool: str | None = None,
        redact: Callable[[str], str] = _secrets.redact_traceback,
    ) -> None:  # the inner one keeps the data
        self.inner = inner
        self.sinks: list[Callable[[float], None]] = []
        self._what = what
        self._pool = pool  # the pool's name, for the log record's fields
        # A failing sink's traceback as logged: without the pool's password
        # (its source lines, its message; Reporter.redact).
        self._redact = redact
        self._complained = False
        self._loop = loop
        self._queued: list[float] = []
        # What the hot path appends to: each value recorded (and queued) at once.
        self.pending = _Recording(self)

    def record(self, value: float) -> None:
        self.inner.record(value)
        queued = self._queued
        queued.append(value)
        if len(queued) == 1:  # one callback per loop iteration, whatever the number of values
            try:
                self._loop.call_soon(self.flush)
            except RuntimeError:
                queued.clear()  # the loop is closed: nobody is left to export to

    def flush(self) -> None:
        """Hand the queued values to every sink, in order. A sink's exception
        is logged once (per pool and kind) and swallowed."""
        values, self._queued = self._queued, []
        for sink in list(self.sinks):
            for value in values:
                try:
                    result = sink(value)
                    if result is not None:
                        refuse_awaitable("a timing sink", result)
                except (SystemExit, KeyboardInterrupt):
                    raise  # (as asyncio's Handle._run; the values not handed on yet are dropped)
                except BaseException:  # (CancelledError included, as a listener's: see Reporter.deliver)
                    if not self._complained:
                        self._complained = True
                        # Formatted now and redacted (as a failing event listener's).
                        guarded_logger("safepool").warning(
                            "%s failed\n%s", self._what, self._redact(traceback.format_exc().rstrip()),
                            extra={"event": "timing_sink_failed", "pool": self._pool},
                        )

    def quantile(self, q: float) -> float:
        return self.inner.quantile(q)

    def snapshot(self) -> Distribution:
        return self.inner.snapshot()

    def fold(self) -> None:
        self.inner.fold()

    # The hot path's ``zeros += 1``: each one recorded (and queued) at once.
    @property
    def zeros(self) -> int:
        return 0

    @zeros.setter
    def zeros(self, value: int) -> None:
        for _ in range(value):
            self.record(0.0)

    # The base class's slots stay empty here; read the inner histogram's
    # (which files what it held back first).
    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def sum(self) -> float:
        return self.inner.sum

    @property
    def max(self) -> float:
        return self.inner.max


class _Recording(list):  # type: ignore[type-arg]
    """A :class:`TeeHistogram`'s ``pending``: appending records the value
    (into the inner histogram and the sinks' queue), so it stays empty."""

    __slots__ = ("_tee",)

    def __init__(self, tee: TeeHistogram) -> None:
        super().__init__()
        self._tee = tee

    def append(self, value: float) -> None:
        self._tee.record(value)
