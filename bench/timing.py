"""Timing loops the micro-benchmarks share. No side effects on import."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(call: Callable[[int], object], n: int, min_seconds: float) -> float:
    """Seconds per call, cycling over n inputs until min_seconds have gone by."""
    calls, started = 0, time.perf_counter()
    while calls < n or time.perf_counter() - started < min_seconds:
        call(calls % n)
        calls += 1
    return (time.perf_counter() - started) / calls
