"""How long a feedback topic must keep its labels, and what in a topic's settings loses them
earlier. Pure: `streamer.kafka_io` reads the settings from the broker and logs these warnings.

`label_rate` features count labels up to a horizon old (delay + longest window + 1 h); a
restarted replica rebuilds its label store by re-reading the whole feedback topic, so the
topic must keep every label that long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Kept on top of the label horizon when the daemon creates the feedback topic: a replica
# behind the live stream, or labels stamped a little before their events' times.
RETENTION_MARGIN_SECONDS = 86400.0


def feedback_retention_ms(label_horizon_seconds: float) -> int:
    """The retention.ms a feedback topic is created with: the labels' horizon plus a margin.

    >>> feedback_retention_ms(37 * 86400.0 + 3600.0) / 86400_000
    38.041666666666664
    """
    return math.ceil((label_horizon_seconds + RETENTION_MARGIN_SECONDS) * 1000)


def retention_warning(topic: str, retention_ms: int, label_horizon_seconds: float) -> str | None:
    """What is wrong with a feedback topic that keeps messages `retention_ms` (-1: forever),
    when labels up to `label_horizon_seconds` old still change features; None if nothing.

    A restarted replica rebuilds its labels by re-reading the whole topic: whatever the
    broker deleted is gone from its features (they differ from those of a replica that ran
    throughout). Retention counts from a record's timestamp, never before its event's time.

    >>> retention_warning("fb", -1, 86400.0) is None
    True
    >>> short = retention_warning("fb", 604800000, 37 * 86400.0 + 3600.0)
    >>> short.split(", but")[0]
    "feedback topic 'fb' keeps messages 7.0 days (retention.ms=604800000)"
    >>> short.split("; ")[-1]
    'set its retention.ms to at least 3286800000 (38.0 days) or -1'
    """
    needed_ms = label_horizon_seconds * 1000.0
    if retention_ms < 0 or retention_ms >= needed_ms:
        return None
    wanted = feedback_retention_ms(label_horizon_seconds)
    return (
        f"feedback topic {topic!r} keeps messages {days(retention_ms)} (retention.ms="
        f"{retention_ms}), but labels up to {days(needed_ms)} old still change the label_rate "
        "features (delay + longest window + 1 h): a restarted replica re-reads the topic and "
        f"misses the older labels; set its retention.ms to at least {wanted} "
        f"({days(wanted)}) or -1"
    )


def days(ms: float) -> str:
    return f"{ms / 86400_000:.1f} days"


@dataclass(frozen=True)
class Retention:
    """What decides how long a topic keeps its messages, as the broker applies it. None: the
    broker did not say."""

    retention_ms: int | None
    retention_bytes: int | None = -1  # per partition; -1: no limit
    cleanup_policy: str | None = "delete"  # "delete", "compact" or "compact,delete"


# Created with these besides retention.ms, whatever the broker's defaults: neither size nor
# compaction deletes a label before its time.
FEEDBACK_TOPIC_CONFIG = {"retention.bytes": "-1", "cleanup.policy": "delete"}


def retention_warnings(topic: str, r: Retention, label_horizon_seconds: float) -> list[str]:
    """Everything that makes a feedback topic lose labels younger than the horizon: a short
    retention.ms (`retention_warning`), a size limit (retention.bytes: the oldest segments go
    once a partition outgrows it, however young), and compaction (only the last message of
    each key stays, so labels that share a key are lost).

    >>> retention_warnings("fb", Retention(-1), 86400.0)
    []
    >>> for w in retention_warnings("fb", Retention(-1, 1 << 30, "compact,delete"), 86400.0):
    ...     print(w.split(" (")[0])
    feedback topic 'fb' keeps at most 1073741824 bytes per partition
    feedback topic 'fb' is compacted
    """
    warnings = []
    if r.retention_ms is not None:
        short = retention_warning(topic, r.retention_ms, label_horizon_seconds)
        warnings += [short] if short else []
    if r.retention_bytes is not None and r.retention_bytes >= 0:
        warnings.append(
            f"feedback topic {topic!r} keeps at most {r.retention_bytes} bytes per partition "
            f"(retention.bytes={r.retention_bytes}): the broker deletes its oldest labels once "
            f"it holds more, even those younger than {days(label_horizon_seconds * 1000)} that "
            "still change the label_rate features, and a restarted replica misses them; set its "
            "retention.bytes to -1"
        )
    policies = {p.strip() for p in (r.cleanup_policy or "").split(",")}
    if "compact" in policies:
        warnings.append(
            f"feedback topic {topic!r} is compacted (cleanup.policy={r.cleanup_policy}): "
            "compaction keeps only the last message of each key, so labels that share a key "
            "are lost to a restarted replica; set its cleanup.policy to delete"
        )
    return warnings
