"""The feedback topic's retention against the labels' horizon: how old a label can be and
still change a feature, the retention the daemon creates the topic with, and when an existing
topic's retention is worth a warning."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka.errors import KafkaConnectionError

from streamer import kafka_io, retention
from streamer.features import FeatureSpec, LabelRate, Log1p

DAY, HOUR = 86400.0, 3600.0


def spec(*columns: Any) -> FeatureSpec:
    return FeatureSpec("p", "card", "ts", [Log1p(field="amount"), *columns], id_field="tx")


def test_the_horizon_is_the_longest_delay_plus_window_of_any_label_column() -> None:
    assert spec().label_reach_seconds == 0.0
    week_month = LabelRate(windows_seconds=[DAY, 7 * DAY, 30 * DAY], delay_seconds=7 * DAY)
    assert spec(week_month).label_reach_seconds == 37 * DAY + HOUR
    late_short = LabelRate(windows_seconds=[DAY], delay_seconds=40 * DAY, key="shop")
    assert spec(week_month, late_short).label_reach_seconds == 41 * DAY + HOUR


@pytest.mark.parametrize(
    ("retention_ms", "warned"),
    [
        (-1, False),  # kept forever
        (7 * 86400_000, True),  # the broker's usual default
        (37 * 86400_000, True),  # the windows, without the hour a rounded window adds
        (int((37 * DAY + HOUR) * 1000), False),  # exactly the horizon
        (retention.feedback_retention_ms(37 * DAY + HOUR), False),  # what the daemon creates
    ],
)
def test_a_retention_shorter_than_the_horizon_is_named(retention_ms: int, warned: bool) -> None:
    warning = retention.retention_warning("alert-feedback", retention_ms, 37 * DAY + HOUR)
    assert (warning is not None) is warned
    if warning:
        assert "'alert-feedback'" in warning and f"retention.ms={retention_ms}" in warning
        assert "37.0 days old" in warning


def test_the_topic_is_created_with_the_horizon_and_a_margin() -> None:
    horizon = 37 * DAY + HOUR
    created = retention.feedback_retention_ms(horizon)
    assert created == (horizon + retention.RETENTION_MARGIN_SECONDS) * 1000
    assert retention.retention_warning("t", created, horizon) is None


class FakeAdmin:
    def __init__(self, described: Any) -> None:
        self.described = described

    def describe_configs(self, resources: list[Any], config_filter: str) -> Any:
        if isinstance(self.described, Exception):
            raise self.described
        (resource,) = resources
        assert resource.name == "fb" and config_filter == "all"
        return self.described


@pytest.mark.parametrize(
    ("described", "level", "says"),
    [
        ({"topic": {"fb": {"retention.ms": {"value": "604800000"}}}}, "WARNING", "7.0 days"),
        ({"topic": {"fb": {"retention.ms": {"value": "-1"}}}}, "INFO", "keeps labels forever"),
        ({"topic": {"fb": {}}}, "WARNING", "not checked: the broker did not say"),
        (KafkaConnectionError("down"), "WARNING", "not checked: KafkaConnectionError"),
    ],
)
def test_the_check_logs_and_never_raises(
    described: Any, level: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="streamer.kafka_io"):
        kafka_io.check_retention(FakeAdmin(described), "fb", 37 * DAY + HOUR)  # type: ignore[arg-type]
    (record,) = caplog.records
    assert record.levelname == level and says in record.getMessage()
    assert "'fb'" in record.getMessage()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (retention.Retention(-1), []),
        (retention.Retention(-1, -1, "delete"), []),
        (retention.Retention(-1, None, None), []),  # the broker did not say: nothing to warn of
        (retention.Retention(-1, 1 << 30), ["retention.bytes=1073741824"]),
        (retention.Retention(-1, 0), ["retention.bytes=0"]),
        (retention.Retention(-1, -1, "compact"), ["cleanup.policy=compact"]),
        (retention.Retention(-1, -1, "compact,delete"), ["cleanup.policy=compact,delete"]),
        (retention.Retention(-1, -1, "delete, compact"), ["cleanup.policy=delete, compact"]),
        (
            retention.Retention(7 * 86400_000, 1 << 20, "compact"),
            ["retention.ms=604800000", "retention.bytes=1048576", "cleanup.policy=compact"],
        ),
    ],
)
def test_a_size_limit_or_compaction_is_named_too(
    settings: retention.Retention, named: list[str]
) -> None:
    """Labels younger than the horizon are lost by size (retention.bytes) or by compaction
    (only each key's last message stays) as surely as by a short retention.ms."""
    warnings = retention.retention_warnings("fb", settings, 37 * DAY + HOUR)
    assert len(warnings) == len(named)
    for warning, name in zip(warnings, named, strict=True):
        assert "'fb'" in warning and name in warning
    for warning in warnings:  # each says what to set
        if "retention.bytes=" in warning:
            assert warning.endswith("set its retention.bytes to -1")
        if "cleanup.policy=" in warning:
            assert warning.endswith("set its cleanup.policy to delete")


def test_the_topic_is_created_kept_by_time_alone() -> None:
    """Whatever the broker's defaults, the feedback topic the daemon creates is neither
    limited by size nor compacted, and the check finds nothing to say about it."""
    assert retention.FEEDBACK_TOPIC_CONFIG == {"retention.bytes": "-1", "cleanup.policy": "delete"}
    horizon = 37 * DAY + HOUR
    created = retention.Retention(retention.feedback_retention_ms(horizon), -1, "delete")
    assert retention.retention_warnings("t", created, horizon) == []


def test_the_check_logs_one_warning_per_way_labels_are_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    described = {
        "topic": {
            "fb": {
                "retention.ms": {"value": "-1"},
                "retention.bytes": {"value": "1048576"},
                "cleanup.policy": {"value": "compact"},
            }
        }
    }
    with caplog.at_level(logging.INFO, logger="streamer.kafka_io"):
        kafka_io.check_retention(FakeAdmin(described), "fb", 37 * DAY + HOUR)  # type: ignore[arg-type]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "retention.bytes=1048576" in caplog.records[0].getMessage()
    assert "cleanup.policy=compact" in caplog.records[1].getMessage()
