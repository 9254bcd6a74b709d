"""The values passed between stages: raw messages in; alerts and dead letters out."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import msgspec

ALERT_SCHEMA_VERSION = 1


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


class ModelRef(msgspec.Struct, frozen=True):
    version: str
    kind: str


class Alert(msgspec.Struct, frozen=True):
    """The JSON document published to the alert topic, keyed by entity."""

    alert_id: str
    schema_version: int
    profile: str
    entity_field: str
    entity: str | int
    event_id: str | int | None
    event_time: str
    detected_at: str
    score: float
    threshold: float
    quantile: float
    model: ModelRef
    top_features: list[FeatureContribution]
    source: SourcePosition


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
