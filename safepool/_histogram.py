"""A fixed-bucket histogram: O(1) memory, O(log buckets) per record."""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass

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
    """A snapshot of a histogram; quantiles are bucket upper bounds (an over-estimate)."""

    count: int
    sum: float
    max: float
    p50: float
    p90: float
    p99: float
    bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]  # one per bound, plus one for +Inf


class Histogram:
    __slots__ = ("_bounds", "_counts", "count", "sum", "max")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value
        if value > self.max:
            self.max = value

    def record_zero(self) -> None:
        """``record(0.0)``, without the search (an acquire that did not wait)."""
        self._counts[0] += 1
        self.count += 1

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for index, bucket in enumerate(self._counts):
            seen += bucket
            if seen >= rank:
                # The +Inf bucket has no bound: the largest value seen is the best answer.
                return min(self._bounds[index], self.max) if index < len(self._bounds) else self.max
        return self.max

    def _quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Several quantiles (ascending) in one pass over the buckets."""
        answers: list[float] = []
        if self.count == 0:
            return [0.0] * len(qs)
        bounds, last = self._bounds, len(self._bounds)
        seen = 0
        pending = iter(qs)
        rank = next(pending) * self.count
        for index, bucket in enumerate(self._counts):
            seen += bucket
            while seen >= rank:
                answers.append(min(bounds[index], self.max) if index < last else self.max)
                try:
                    rank = next(pending) * self.count
                except StopIteration:
                    return answers
        answers.extend([self.max] * (len(qs) - len(answers)))
        return answers

    def snapshot(self) -> Distribution:
        p50, p90, p99 = self._quantiles((0.5, 0.9, 0.99))
        return Distribution(
            count=self.count,
            sum=self.sum,
            max=self.max,
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

    __slots__ = ("inner", "sinks", "_what", "_complained", "_loop", "_queued")

    def __init__(
        self, inner: Histogram, loop: asyncio.AbstractEventLoop, what: str = "a timing sink"
    ) -> None:  # the inner one keeps the data
        self.inner = inner
        self.sinks: list[Callable[[float], None]] = []
        self._what = what
        self._complained = False
        self._loop = loop
        self._queued: list[float] = []

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
                    sink(value)
                except Exception:
                    if not self._complained:
                        self._complained = True
                        logging.getLogger("safepool").warning("%s failed", self._what, exc_info=True)

    def record_zero(self) -> None:
        self.record(0.0)

    def quantile(self, q: float) -> float:
        return self.inner.quantile(q)

    def snapshot(self) -> Distribution:
        return self.inner.snapshot()

    # The base class's slots stay empty here; read the inner histogram's.
    @property
    def count(self) -> int:  # type: ignore[override]
        return self.inner.count

    @property
    def sum(self) -> float:  # type: ignore[override]
        return self.inner.sum

    @property
    def max(self) -> float:  # type: ignore[override]
        return self.inner.max
