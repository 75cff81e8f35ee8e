"""Latency of a dense teacher and its student, measured in one run on the same inputs.

These machines drift (the same session ran 1.45 s in one round, 1.75 s in the next), so teacher and
student calls are interleaved A B A B ... and every figure comes from the same window of time. The
speedup is teacher p50 / student p50; the median of the per-pair ratios is reported beside it as a
check that drift did not move the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Latency:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, times: list[float]) -> "Latency":
        ms = np.asarray(times) * 1e3
        return cls(float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(ms.mean()), float(ms.min()), len(ms))


@dataclass
class PairedLatency:
    teacher: Latency
    student: Latency
    speedup: float              # teacher p50 / student p50
    speedup_pair_median: float  # median over pairs of teacher time / student time


def _time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_pair(teacher: Callable[[], object], student: Callable[[], object], warmup: int, runs: int,
                 progress: Callable[[int], None] | None = None) -> PairedLatency:
    """Warm both up, then time ``runs`` interleaved pairs. Each callable runs one full call."""
    for _ in range(warmup):
        teacher()
        student()
    t_times, s_times = [], []
    for i in range(runs):
        # alternate who goes first so neither always runs on a cache the other just warmed
        if i % 2 == 0:
            t_times.append(_time_call(teacher))
            s_times.append(_time_call(student))
        else:
            s_times.append(_time_call(student))
            t_times.append(_time_call(teacher))
        if progress:
            progress(1)
    t, s = Latency.from_seconds(t_times), Latency.from_seconds(s_times)
    pair = statistics.median(a / b for a, b in zip(t_times, s_times))
    return PairedLatency(t, s, t.p50_ms / s.p50_ms, pair)


@dataclass
class Rounds:
    """Call times of several models timed round-robin in one window, in seconds, one entry per round."""

    times: dict[str, list[float]]

    def latency(self, name: str) -> Latency:
        return Latency.from_seconds(self.times[name])

    def ratio_median(self, reference: str, name: str) -> float:
        """Median over rounds of ``reference`` time / ``name`` time: a speedup that drift between rounds cannot move."""
        return statistics.median(a / b for a, b in zip(self.times[reference], self.times[name]))


def measure_rounds(calls: dict[str, Callable[[], object]], warmup: int, runs: int,
                   progress: Callable[[int], None] | None = None) -> Rounds:
    """Time several models round-robin in one window; each round starts one model later.

    The pairwise version of this is :func:`measure_pair`; here any number of variants (dense,
    pruned, INT8, on several backends) share the same drift.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            times[name].append(_time_call(calls[name]))
        if progress:
            progress(1)
    return Rounds(times)


def measure_group(calls: dict[str, Callable[[], object]], warmup: int, runs: int,
                  progress: Callable[[int], None] | None = None) -> dict[str, Latency]:
    """:func:`measure_rounds`, as one :class:`Latency` per model."""
    rounds = measure_rounds(calls, warmup, runs, progress)
    return {name: rounds.latency(name) for name in calls}


def measure_group_against(calls: dict[str, Callable[[], object]], reference: str, warmup: int, runs: int,
                          progress: Callable[[int], None] | None = None) -> tuple[dict[str, Latency], dict[str, float]]:
    """:func:`measure_group`, plus for each model the median over rounds of ``reference`` time / its time
    (the drift check :func:`measure_pair` reports as ``speedup_pair_median``)."""
    rounds = measure_rounds(calls, warmup, runs, progress)
    return {n: rounds.latency(n) for n in calls}, {n: rounds.ratio_median(reference, n) for n in calls}
