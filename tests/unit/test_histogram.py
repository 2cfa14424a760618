"""The fixed-bucket histogram behind wait and lease time distributions."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from safepool._histogram import Histogram


def test_empty_histogram_reports_zeros() -> None:
    snap = Histogram().snapshot()
    assert (snap.count, snap.sum, snap.max, snap.p50, snap.p99) == (0, 0.0, 0.0, 0.0, 0.0)


def test_quantiles_are_bucket_upper_bounds_capped_by_max() -> None:
    hist = Histogram(bounds=(0.001, 0.01, 0.1, 1.0))
    for _ in range(90):
        hist.record(0.0005)
    for _ in range(9):
        hist.record(0.05)
    hist.record(3.0)
    snap = hist.snapshot()
    assert snap.p50 == 0.001 and snap.p90 == 0.001 and snap.p99 == 0.1
    assert snap.max == 3.0 and snap.bucket_counts == (90, 0, 9, 0, 1)


def test_repr_leaves_the_buckets_out_and_equality_keeps_them() -> None:
    # print(pool.stats()) printed every bucket of three distributions: one
    # line of about 3,000 characters (fresh-clone trial, s78).
    hist = Histogram()
    hist.record(0.002)
    snap = hist.snapshot()
    text = repr(snap)
    assert text.startswith("Distribution(count=1, sum=0.002, max=0.002, p50=")
    assert "bounds" not in text and "bucket_counts" not in text
    assert len(text) < 150
    assert sum(snap.bucket_counts) == 1 and len(snap.bounds) > 20  # still fields


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), min_size=1, max_size=200))
def test_one_pass_quantiles_match_the_per_quantile_answer(values: list[float]) -> None:
    hist = Histogram()
    for value in values:
        hist.record(value)
    snap = hist.snapshot()
    assert (snap.p50, snap.p90, snap.p99) == (hist.quantile(0.5), hist.quantile(0.9), hist.quantile(0.99))
    assert snap.p50 <= snap.p90 <= snap.p99 <= snap.max


def test_memory_is_fixed() -> None:
    hist = Histogram()
    for _ in range(100_000):
        hist.record(random.random())
    assert len(hist.snapshot().bucket_counts) == len(hist.snapshot().bounds) + 1


def test_values_the_hot_path_holds_back_are_read_like_recorded_ones() -> None:
    """``zeros`` and ``pending`` (the pool's hot path, no call per value) give
    every reader what record() would have given."""
    lazy, eager = Histogram(), Histogram()
    for value in (0.0, 0.0, 0.003, 0.2, 7.0):
        eager.record(value)
    lazy.zeros += 2
    lazy.pending.extend([0.003, 0.2, 7.0])
    assert (lazy.count, lazy.sum, lazy.max) == (eager.count, eager.sum, eager.max) == (5, 7.203, 7.0)
    assert lazy.snapshot() == eager.snapshot() and lazy.quantile(0.5) == eager.quantile(0.5)
    assert lazy.zeros == 0 and lazy.pending == []  # filed by the first read
    lazy.pending.append(0.5)
    assert lazy.snapshot().count == 6 and lazy.quantile(1.0) == 7.0
