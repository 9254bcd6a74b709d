"""The values passed between stages: raw messages in; alerts and dead letters out."""

from __future__ import annotations

import hashlib
import inspect
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

# 2: every message on the alert topic carries `type` ("alert" or "incident").
ALERT_SCHEMA_VERSION = 2


class RawMessage(NamedTuple):
    """One Kafka record as the consumer gave it; the pipeline never sees a Kafka object."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


class SourcePosition(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    offset: int


class FeatureContribution(msgspec.Struct, frozen=True):
    feature: str
    actual: float
    reconstructed: float
    contribution: float  # share of the event's squared reconstruction error


SCORE = (
    "The score the threshold compared, on the scale of `threshold`: the event's reconstruction "
    "error, or with [smoothing] its smoothed score (EWMA or moving mean)."
)
RAW_SCORE = (
    "The event's own reconstruction error, where `score` is smoothed and differs from it; "
    "absent otherwise."
)


BEYOND_RANGE = (
    "True when one of the event's features lay beyond the range seen so far "
    "(threshold.range_tolerance): such an event alerts whatever its score; absent otherwise."
)


class ModelRef(msgspec.Struct, frozen=True):
    version: str
    kind: str


# omit_defaults: `raw_score` (None unless smoothed) and `beyond_range` (False unless that rule
# fired) are left out of the JSON, so a plain alert is what it was before those fields; no
# other field of an alert has a default.
class Alert(msgspec.Struct, frozen=True, tag_field="type", tag="alert", omit_defaults=True):
    """One anomalous event, published to the alert topic keyed by entity."""

    alert_id: str
    schema_version: int
    profile: str
    entity_field: str
    entity: str | int
    event_id: str | int | None
    event_time: str
    detected_at: str
    score: Annotated[float, msgspec.Meta(description=SCORE)]
    threshold: float
    quantile: float
    model: ModelRef
    top_features: list[FeatureContribution]
    source: SourcePosition
    raw_score: Annotated[float | None, msgspec.Meta(description=RAW_SCORE)] = None
    beyond_range: Annotated[bool, msgspec.Meta(description=BEYOND_RANGE)] = False


IncidentStatus = Literal["open", "update", "resolve"]


class Incident(msgspec.Struct, frozen=True, tag_field="type", tag="incident"):
    """One entity's run of alerts, published to the alert topic keyed by entity.

    `open` when the run starts (or has lasted `incidents.min_duration_seconds`), `update` at
    most every `incidents.update_seconds` while alerts keep coming, `resolve` after
    `incidents.quiet_seconds` without one. The id is derived from the entity and the run's
    first alert, so a replay gives the same id; `sequence` orders one incident's messages.
    """

    incident_id: str
    schema_version: int
    status: IncidentStatus
    sequence: int
    profile: str
    entity_field: str
    entity: str | int
    opened_at: str  # event time of the run's first alert
    last_alert_at: str  # event time of its latest alert
    resolved_at: str | None  # event time the quiet period ended (resolve only)
    alerts: int  # alerts in the run so far
    max_score: float
    threshold: float  # the threshold the highest-scoring alert exceeded
    model: ModelRef
    first_alert_id: str
    last_alert_id: str
    top_features: list[FeatureContribution]  # of the highest-scoring alert
    published_at: str  # wall clock


class DeadLetter(NamedTuple):
    """A message that could not be used, with why and where it came from."""

    message: RawMessage
    reason: str  # short, fixed vocabulary: also the metric label
    detail: str


def alert_id(topic: str, partition: int, offset: int) -> str:
    """Deterministic id: a replay of the same input position gives the same alert id.

    >>> alert_id("orders", 0, 42) == alert_id("orders", 0, 42)
    True
    """
    digest = hashlib.blake2b(f"{topic}\x00{partition}\x00{offset}".encode(), digest_size=16)
    return digest.hexdigest()


def incident_id(entity_field: str, entity: str | int, first_alert_id: str) -> str:
    """Deterministic: the same run of alerts (same first alert) gives the same incident id."""
    key = f"{entity_field}\x00{entity}\x00{first_alert_id}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def alert_topic_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every message on the alert topic: alerts and incidents.

    Published as docs/alert-topic.schema.json (`python -m streamer schema` prints it); a
    test keeps the file equal to this.
    """
    schema = msgspec.json.schema(Alert | Incident)
    for definition in ("Alert", "Incident"):
        props = schema["$defs"][definition]["properties"]
        props["schema_version"] = {"const": ALERT_SCHEMA_VERSION}
    for definition in schema["$defs"].values():
        # msgspec >= 0.23 dedents docstrings, older releases do not: one file for both.
        if "description" in definition:
            definition["description"] = inspect.cleandoc(definition["description"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Messages on the alert topic",
        "description": (
            "Keyed by entity. `type` tells an alert (one anomalous event) from an incident "
            "message (open, update or resolve of one entity's run of alerts)."
        ),
        **schema,
    }
