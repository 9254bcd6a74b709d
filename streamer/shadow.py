"""Shadow scoring: a candidate bundle scores the same batches as the current one, silently.

The rule, in full: once the candidate has scored `shadow.min_events` events, compare the two
alert rates over the events both saw. Each rate is smoothed as (alerts + 1) / (events + 1)
so that zero alerts on either side is still a number. The candidate is **promoted** (the
registry's `current` moves to it, and the hot reload swaps it in) when its rate is within a
factor `shadow.max_rate_ratio` of the current one's, either way; otherwise it is **rolled
back** (the `candidate` pointer is removed and the version is not shadowed again by this
replica). With `shadow.auto_promote = false` the daemon only reports: it logs what the rule
says and keeps shadowing.

>>> stats = ShadowStats()
>>> stats.add(current_alerts=10, candidate_alerts=14, events=10_000)
>>> decide(stats, min_events=5_000, max_rate_ratio=2.0)
'promote'
>>> stats.add(current_alerts=0, candidate_alerts=400, events=10_000)
>>> decide(stats, min_events=5_000, max_rate_ratio=2.0)
'roll_back'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Decision = Literal["wait", "promote", "roll_back"]


@dataclass
class ShadowStats:
    events: int = 0  # events both models scored
    current_alerts: int = 0
    candidate_alerts: int = 0

    def add(self, current_alerts: int, candidate_alerts: int, events: int) -> None:
        self.events += events
        self.current_alerts += current_alerts
        self.candidate_alerts += candidate_alerts

    def rates(self) -> tuple[float, float]:
        """Smoothed alert rates (current, candidate)."""
        n = self.events + 1
        return (self.current_alerts + 1) / n, (self.candidate_alerts + 1) / n


def decide(stats: ShadowStats, min_events: int, max_rate_ratio: float) -> Decision:
    if stats.events < min_events:
        return "wait"
    current, candidate = stats.rates()
    ratio = candidate / current
    return "promote" if 1.0 / max_rate_ratio <= ratio <= max_rate_ratio else "roll_back"
