"""Incidents: one entity's run of alerts -> open, throttled updates, resolve; and the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgspec

from streamer.config import IncidentSettings
from streamer.incidents import IncidentTracker
from streamer.records import (
    Alert,
    FeatureContribution,
    ModelRef,
    SourcePosition,
    alert_id,
    alert_topic_schema,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "alert-topic.schema.json"


def alert(entity: str, offset: int, score: float = 2.0) -> Alert:
    return Alert(
        alert_id=alert_id("in", 0, offset), schema_version=2, profile="sensors",
        entity_field="sensor_id", entity=entity, event_id=f"r-{offset}",
        event_time=f"t{offset}", detected_at="now", score=score, threshold=1.0, quantile=0.99,
        model=ModelRef("v1", "lstm"),
        top_features=[FeatureContribution("rpm", 1.0, 0.5, 1.0)],
        source=SourcePosition("in", 0, offset),
    )  # fmt: skip


def feed(
    tracker: IncidentTracker, items: list[tuple[str, float]], step: float = 1.0
) -> list[tuple[str, str, int]]:
    """(entity, time) alerts, one batch each; returns (entity, status, alerts) messages."""
    out = []
    for n, (entity, t) in enumerate(items):
        for m in tracker.observe([alert(entity, n, score=float(n))], [t], now={0: t}):
            out.append((str(m.entity), m.status, m.alerts))
    return out


def test_a_long_anomaly_is_one_incident_with_throttled_updates_and_a_resolve() -> None:
    t = IncidentTracker(IncidentSettings(quiet_seconds=30, update_seconds=10), 100)
    messages = feed(t, [("s1", float(s)) for s in range(0, 40)])  # an alert a second, 40 s
    assert messages[0] == ("s1", "open", 1)
    assert [m[1] for m in messages[1:]] == ["update"] * 3  # at 10, 20, 30 s
    assert t.observe([], [], now={0: 68.0}) == []  # the last alert was at 39 s: 29 s quiet
    (resolve,) = t.observe([], [], now={0: 69.0})
    assert resolve.status == "resolve" and resolve.alerts == 40 and resolve.sequence == 4
    assert resolve.max_score == 39.0 and resolve.resolved_at is not None


def test_incident_ids_are_deterministic_and_per_run() -> None:
    settings = IncidentSettings(quiet_seconds=5)
    runs = [("s1", 0.0), ("s1", 1.0), ("s1", 20.0)]  # a quiet gap: two runs, two incidents
    ids = []
    for _ in range(2):
        t = IncidentTracker(settings, 100)
        msgs = [m for n, (e, s) in enumerate(runs) for m in t.observe([alert(e, n)], [s], {0: s})]
        ids.append([m.incident_id for m in msgs if m.status == "open"])
    assert ids[0] == ids[1] and len(set(ids[0])) == 2


def test_min_duration_suppresses_blips_and_cooldown_suppresses_flapping() -> None:
    s = IncidentSettings(min_duration_seconds=3, quiet_seconds=5, cooldown_seconds=60)
    t = IncidentTracker(s, 100)
    assert feed(t, [("blip", 0.0)]) == []  # one alert, never lasts 3 s
    assert t.observe([], [], now={0: 10.0}) == []  # expires without a resolve
    msgs = feed(t, [("s2", 20.0), ("s2", 21.0), ("s2", 23.0)])
    assert [m[1] for m in msgs] == ["open"]
    assert [m.status for m in t.observe([], [], now={0: 30.0})] == ["resolve"]
    # Flapping back within the cooldown opens nothing; after it, a new incident.
    assert feed(t, [("s2", 40.0), ("s2", 44.0)]) == []
    assert [m[1] for m in feed(t, [("s2", 100.0), ("s2", 104.0)])] == ["open"]


def test_entities_are_independent_and_capped() -> None:
    t = IncidentTracker(IncidentSettings(quiet_seconds=100), max_entities=2)
    msgs = feed(t, [("a", 0.0), ("b", 1.0), ("c", 2.0)])
    # Opening "c" pushes out "a", whose subscribers get a resolve rather than silence.
    assert msgs == [("a", "open", 1), ("b", "open", 1), ("a", "resolve", 1), ("c", "open", 1)]
    assert t.entities == 2 and t.evictions == 1


def test_published_schema_is_current_and_accepts_real_messages() -> None:
    schema = alert_topic_schema()
    assert json.loads(SCHEMA_FILE.read_text()) == schema, (
        "docs/alert-topic.schema.json is stale: python -m streamer schema > it"
    )
    t = IncidentTracker(IncidentSettings(quiet_seconds=1), 10)
    a = alert("s1", 7)
    (opened,) = t.observe([a], [0.0], now={0: 0.0})
    (resolved,) = t.observe([], [], now={0: 5.0})
    validator = jsonschema.Draft202012Validator(schema)
    smoothed = msgspec.structs.replace(a, raw_score=2.0 * a.score)
    for message in (a, smoothed, opened, resolved):
        doc = json.loads(msgspec.json.encode(message))
        validator.validate(doc)
    bad = json.loads(msgspec.json.encode(opened))
    bad["status"] = "reopened"
    assert not validator.is_valid(bad)
    assert json.loads(msgspec.json.encode(a))["type"] == "alert"


def test_each_partition_keeps_its_own_clock() -> None:
    """A backlog read partition by partition: partition 1 is done (up to 500 s, with a late
    alert) before partition 0's hot sensor is read. Partition 1's clock must neither block
    nor hasten the resolve of partition 0's incident."""

    def on(partition: int, entity: str, n: int) -> Alert:
        a = alert(entity, n)
        return msgspec.structs.replace(a, source=SourcePosition("in", partition, n))

    t = IncidentTracker(IncidentSettings(quiet_seconds=20), 100)
    t.observe([on(1, "s-x", 0)], [495.0], now={1: 500.0})
    hot = [on(0, "s-03", n) for n in range(1, 61)]
    messages = t.observe(hot, [150.0 + n for n in range(60)], now={0: 215.0})
    assert [m.status for m in messages] == ["open"]  # 215 - 209 < 20: still going
    (resolved,) = t.observe([], [], now={0: 300.0})
    assert resolved.entity == "s-03" and resolved.status == "resolve" and resolved.alerts == 60
