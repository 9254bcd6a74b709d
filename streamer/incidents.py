"""Incidents, not storms: one entity's consecutive alerts become one incident.

Pure and keyed by entity. Time is event time: each alert's own, and for resolving, the
latest event time seen in the entity's input partition (the daemon's clock never waits on
the wall clock, so a replay decides exactly as the live run did). Per entity:

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
>>> [m.status for m in t.observe([alert(0), alert(1)], [0.0, 1.0], now={0: 1.0})]
['open']
>>> [m.status for m in t.observe([alert(2)], [6.0], now={0: 6.0})]
['update']
>>> t.observe([], [], now={1: 100.0})  # another partition's clock resolves nothing here
[]
>>> [(m.status, m.alerts) for m in t.observe([], [], now={0: 16.0})]
[('resolve', 3)]
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
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
    partition: int
    count: int = 1
    opened: bool = False
    sequence: int = 0  # messages sent so far
    sent_t: float = float("-inf")


class IncidentTracker:
    """Runs of alerts per entity. Event time runs per input partition (one entity, one
    partition): a lagging partition's entities are never resolved by another partition's
    clock, which may be minutes ahead when a backlog is read partition by partition."""

    def __init__(self, settings: IncidentSettings, max_entities: int) -> None:
        self.settings = settings
        self.max_entities = max_entities
        self.evictions = 0
        self._runs: OrderedDict[Hashable, _Run] = OrderedDict()  # least recently alerted first
        # Per partition: its clock (latest event time seen) and a heap of (last alert time,
        # entity); an entry is stale when the run has alerted since, and is skipped.
        self._clock: dict[int, float] = {}
        self._quiet: dict[int, list[tuple[float, int, Hashable]]] = {}
        self._pushes = 0  # tie-breaker: entities need not be comparable
        self._cooldown: dict[Hashable, float] = {}  # entity -> event time it ends

    @property
    def open(self) -> int:
        return sum(1 for r in self._runs.values() if r.opened)

    @property
    def entities(self) -> int:
        return len(self._runs)

    def clear(self) -> None:
        self._runs.clear()
        self._clock.clear()
        self._quiet.clear()
        self._cooldown.clear()

    def observe(
        self, alerts: Sequence[Alert], times: Sequence[float], now: Mapping[int, float]
    ) -> list[Incident]:
        """Feed a batch's alerts (with their event times) and each input partition's latest
        event time in the batch; returns the incident messages to publish, in order."""
        out: list[Incident] = []
        s = self.settings
        for alert, t in zip(alerts, times, strict=True):
            partition = alert.source.partition
            self._advance(partition, t, out)
            key = alert.entity
            if self._cooldown.get(key, float("-inf")) > t:
                continue
            run = self._runs.get(key)
            if run is None:
                run = self._runs[key] = _Run(alert, t, alert, t, alert, partition)
                self._evict(out)
            else:
                self._runs.move_to_end(key)
                run.count += 1
                run.last, run.last_t = alert, max(run.last_t, t)
                if alert.score > run.top.score:
                    run.top = alert
            self._pushes += 1
            heapq.heappush(self._quiet.setdefault(partition, []), (run.last_t, self._pushes, key))
            if not run.opened and run.last_t - run.first_t >= s.min_duration_seconds:
                run.opened = True
                out.append(self._message(run, "open"))
            elif run.opened and run.last_t - run.sent_t >= s.update_seconds:
                out.append(self._message(run, "update"))
        for partition, t in now.items():
            self._advance(partition, t, out)
        return out

    def _advance(self, partition: int, now: float, out: list[Incident]) -> None:
        """Move a partition's clock and resolve its runs quiet for `quiet_seconds`."""
        clock = max(self._clock.get(partition, float("-inf")), now)
        self._clock[partition] = clock
        quiet = self.settings.quiet_seconds
        heap = self._quiet.get(partition, [])
        while heap and clock - heap[0][0] >= quiet:
            last_t, _, key = heapq.heappop(heap)
            run = self._runs.get(key)
            if run is None or run.last_t != last_t or run.partition != partition:
                continue  # alerted again since (a later entry stands for it), or gone
            del self._runs[key]
            if run.opened:  # a blip shorter than min_duration just expires
                out.append(self._message(run, "resolve", resolved_t=run.last_t + quiet))
                if self.settings.cooldown_seconds:
                    self._cooldown[key] = run.last_t + quiet + self.settings.cooldown_seconds
        if len(self._cooldown) > self.max_entities:
            low = min(self._clock.values())
            self._cooldown = {k: v for k, v in self._cooldown.items() if v > low}

    def _evict(self, out: list[Incident]) -> None:
        while len(self._runs) > self.max_entities:
            _, run = self._runs.popitem(last=False)
            self.evictions += 1
            if run.opened:  # subscribers must not wait forever for its resolve
                clock = self._clock.get(run.partition, run.last_t)
                out.append(self._message(run, "resolve", resolved_t=clock))

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
