"""Incidents, not storms: one entity's consecutive alerts become one incident.

Pure and keyed by entity. Time is event time: each alert's own, and for resolving, the
latest event time seen in the stream (the daemon's clock never waits on the wall clock, so a
replay decides exactly as the live run did). Per entity:

- a run starts with an alert and goes on while the entity's alerts come less than
  `quiet_seconds` apart;
- it opens an incident (`open`) once its alerts span `min_duration_seconds` (0: at once);
  a shorter blip opens nothing;
- while open, an alert sends an `update` if the last message is `update_seconds` old;
- `quiet_seconds` after the last alert the incident is resolved (`resolve`), and for
  `cooldown_seconds` after that the entity opens no new incident (its alerts still go out
  as alerts when those are published).

>>> from streamer.config import IncidentSettings
>>> from streamer.records import Alert, ModelRef, SourcePosition
>>> def alert(i):
...     return Alert(f"a{i}", 2, "p", "k", "e1", None, "", "", 2.0, 1.0, 0.99,
...                  ModelRef("v", "dense"), [], SourcePosition("t", 0, i))
>>> t = IncidentTracker(IncidentSettings(quiet_seconds=10, update_seconds=5), 100)
>>> [m.status for m in t.observe([alert(0), alert(1)], [0.0, 1.0], now=1.0)]
['open']
>>> [m.status for m in t.observe([alert(2)], [6.0], now=6.0)]
['update']
>>> [(m.status, m.alerts) for m in t.observe([], [], now=16.0)]
[('resolve', 3)]
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from streamer.config import IncidentSettings
from streamer.records import ALERT_SCHEMA_VERSION, Alert, Incident, IncidentStatus, incident_id


@dataclass
class _Run:
    first: Alert
    first_t: float
    last: Alert
    last_t: float
    top: Alert  # the highest-scoring alert so far
    count: int = 1
    opened: bool = False
    sequence: int = 0  # messages sent so far
    sent_t: float = float("-inf")


class IncidentTracker:
    def __init__(self, settings: IncidentSettings, max_entities: int) -> None:
        self.settings = settings
        self.max_entities = max_entities
        self.evictions = 0
        # Ordered by last alert time (moved to the end on each alert): the quiet ones are
        # at the front, so resolving looks at no more runs than it resolves.
        self._runs: OrderedDict[Hashable, _Run] = OrderedDict()
        self._cooldown: dict[Hashable, float] = {}  # entity -> event time it ends
        self.clock = float("-inf")

    @property
    def open(self) -> int:
        return sum(1 for r in self._runs.values() if r.opened)

    @property
    def entities(self) -> int:
        return len(self._runs)

    def clear(self) -> None:
        self._runs.clear()
        self._cooldown.clear()
        self.clock = float("-inf")

    def observe(
        self, alerts: Sequence[Alert], times: Sequence[float], now: float
    ) -> list[Incident]:
        """Feed a batch's alerts (with their event times) and the batch's latest event time;
        returns the incident messages to publish, in order."""
        out: list[Incident] = []
        s = self.settings
        for alert, t in zip(alerts, times, strict=True):
            self._resolve_quiet(t, out)
            key = alert.entity
            if self._cooldown.get(key, float("-inf")) > t:
                continue
            run = self._runs.get(key)
            if run is None:
                run = self._runs[key] = _Run(alert, t, alert, t, alert)
                self._evict(out)
            else:
                self._runs.move_to_end(key)
                run.count += 1
                run.last, run.last_t = alert, max(run.last_t, t)
                if alert.score > run.top.score:
                    run.top = alert
            if not run.opened and run.last_t - run.first_t >= s.min_duration_seconds:
                run.opened = True
                out.append(self._message(run, "open"))
            elif run.opened and run.last_t - run.sent_t >= s.update_seconds:
                out.append(self._message(run, "update"))
        self._resolve_quiet(now, out)
        return out

    def _resolve_quiet(self, now: float, out: list[Incident]) -> None:
        self.clock = max(self.clock, now)
        quiet = self.settings.quiet_seconds
        while self._runs:
            key, run = next(iter(self._runs.items()))
            if self.clock - run.last_t < quiet:
                break
            del self._runs[key]
            if run.opened:  # a blip shorter than min_duration just expires
                out.append(self._message(run, "resolve", resolved_t=run.last_t + quiet))
                if self.settings.cooldown_seconds:
                    self._cooldown[key] = run.last_t + quiet + self.settings.cooldown_seconds
        if len(self._cooldown) > self.max_entities:
            self._cooldown = {k: v for k, v in self._cooldown.items() if v > self.clock}

    def _evict(self, out: list[Incident]) -> None:
        while len(self._runs) > self.max_entities:
            _, run = self._runs.popitem(last=False)
            self.evictions += 1
            if run.opened:  # subscribers must not wait forever for its resolve
                out.append(self._message(run, "resolve", resolved_t=self.clock))

    def _message(
        self, run: _Run, status: IncidentStatus, resolved_t: float | None = None
    ) -> Incident:
        first, top = run.first, run.top
        message = Incident(
            incident_id=incident_id(first.entity_field, first.entity, first.alert_id),
            schema_version=ALERT_SCHEMA_VERSION,
            status=status,
            sequence=run.sequence,
            profile=first.profile,
            entity_field=first.entity_field,
            entity=first.entity,
            opened_at=first.event_time,
            last_alert_at=run.last.event_time,
            resolved_at=None if resolved_t is None else _iso(resolved_t),
            alerts=run.count,
            max_score=top.score,
            threshold=top.threshold,
            model=run.last.model,
            first_alert_id=first.alert_id,
            last_alert_id=run.last.alert_id,
            top_features=top.top_features,
            published_at=_iso(time.time()),
        )
        run.sequence += 1
        run.sent_t = run.last_t
        return message


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
