"""Per-entity smoothing (`[smoothing]` with `threshold.per_entity = true`): each entity judged
as a SmoothedThreshold of its own would judge it; bounded LRU; replay; control; the daemon."""

from __future__ import annotations

import tracemalloc
from collections.abc import Hashable
from itertools import islice
from typing import Any

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.app import Detector, build_pipeline
from streamer.config import Settings, from_mapping
from streamer.entity_smoothing import EntitySmoothedThresholds
from streamer.records import Alert, RawMessage
from streamer.smoothing import SmoothedThreshold, SmoothingSettings
from streamer.threshold import RollingQuantileThreshold
from tests.unit.test_smoothing_daemon import feed, offsets
from training.simulate import simulate

WINDOW, QUANTILE, MIN_SAMPLES = 60, 0.95, 20

OPTIONS = {
    "ewma + cooldown": SmoothingSettings(ewma_alpha=0.3, cooldown_rows=15),
    "likelihood + mean_rows + once_per_run": SmoothingSettings(
        likelihood=0.999, mean_rows=5, once_per_run=True
    ),
    "frozen + margin": SmoothingSettings(frozen=True, margin=1.2, ewma_alpha=0.5),
    "min_consecutive": SmoothingSettings(min_consecutive=3),
    "learn_in_cooldown": SmoothingSettings(cooldown_rows=10, learn_in_cooldown=True),
    "likelihood + once_per_run + rearm_z": SmoothingSettings(
        likelihood=0.99, ewma_alpha=0.3, once_per_run=True, rearm_z=0.0
    ),
    "median_cap": SmoothingSettings(
        median_cap=5.0, likelihood=0.999, ewma_alpha=0.5, once_per_run=True
    ),
}


def interleaved(seed: int, n: int = 4000, entities: int = 7) -> tuple[list[str], np.ndarray]:
    """Entities with their own levels and noise, some with spikes and level shifts,
    interleaved at random (uneven shares)."""
    rng = np.random.default_rng(seed)
    keys = [f"e{k}" for k in rng.choice(entities, size=n, p=np.arange(1, entities + 1) / 28)]
    scores = np.empty(n)
    for k in range(entities):
        rows = np.flatnonzero(np.array(keys) == f"e{k}")
        s = rng.gamma(2.0, 0.3 + 0.2 * k, rows.size)
        s[rng.random(rows.size) < 0.02] *= 8.0  # spikes
        if k % 3 == 0:
            s[rows.size // 2 : rows.size // 2 + 30] += 3.0  # a lasting rise
        scores[rows] = s
    return keys, scores


def cuts(n: int, seed: int) -> list[tuple[int, int]]:
    """Batches cut at arbitrary points (sizes 1 to 300)."""
    rng = np.random.default_rng(seed)
    out, a = [], 0
    while a < n:
        b = min(n, a + int(rng.integers(1, 300)))
        out.append((a, b))
        a = b
    return out


WARM = np.random.default_rng(0).gamma(2.0, 0.5, 500)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("seed", [1, 2])
def test_each_entity_alerts_as_its_own_smoothed_threshold_would(name: str, seed: int) -> None:
    settings = OPTIONS[name]
    keys, scores = interleaved(seed)
    entity = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 100, WARM, settings)
    alone: dict[Hashable, SmoothedThreshold] = {}
    shared = SmoothedThreshold(WINDOW, QUANTILE, MIN_SAMPLES, WARM, settings)
    got, expected, one_state = [], [], []
    for a, b in cuts(len(keys), seed):
        k, s = keys[a:b], scores[a:b]
        flags, used = entity.judge(k, s)
        got.append(flags)
        one_state.append(shared.judge(s))
        want = np.zeros(b - a, dtype=bool)
        # The reference: each entity's rows of the batch, to a SmoothedThreshold of its own.
        for key in dict.fromkeys(k):
            rows = np.flatnonzero(np.array(k) == key)
            t = alone.setdefault(
                key, SmoothedThreshold(WINDOW, QUANTILE, MIN_SAMPLES, WARM, settings)
            )
            bar = max(t.value, t.floor)
            want[rows] = t.judge(s[rows])
            np.testing.assert_array_equal(used[rows], bar)
            np.testing.assert_array_equal(entity.last_smoothed[rows], t.last_smoothed)
            if settings.likelihood:
                np.testing.assert_array_equal(entity.last_z[rows], t.last_z)
        expected.append(want)
    flags, want = np.concatenate(got), np.concatenate(expected)
    np.testing.assert_array_equal(flags, want)
    assert 10 < flags.sum() < len(keys) // 2  # alerts there are, and not everywhere
    # One state over the interleaved stream decides otherwise (what this replaces).
    assert (np.concatenate(one_state) != want).any()


@pytest.mark.parametrize("learn", [False, True])
def test_frozen_entities_do_not_depend_on_batch_cuts(learn: bool) -> None:
    """A frozen (or non-learning) threshold judges by its warm start only: the flags are
    those of each entity's whole series at once, however the batches were cut."""
    settings = SmoothingSettings(frozen=True, ewma_alpha=0.2, min_consecutive=2, cooldown_rows=5)
    keys, scores = interleaved(3)
    entity = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 100, WARM, settings)
    entity.learn = learn
    flags = np.concatenate([entity.judge(keys[a:b], scores[a:b])[0] for a, b in cuts(4000, 3)])
    for key in set(keys):
        rows = np.flatnonzero(np.array(keys) == key)
        t = SmoothedThreshold(WINDOW, QUANTILE, MIN_SAMPLES, WARM, settings)
        np.testing.assert_array_equal(flags[rows], t.judge(scores[rows]))
    assert flags.any()


def test_entities_are_capped_least_recently_scored_first() -> None:
    settings = SmoothingSettings(cooldown_rows=100)
    t = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 3, WARM, settings)
    assert t.judge(["a"], np.array([50.0]))[0].tolist() == [True]  # "a" cools down
    t.judge(["b", "c"], np.array([0.1, 0.1]))
    assert t.judge(["a"], np.array([50.0]))[0].tolist() == [False]  # still cooling: held
    t.judge(["d"], np.array([0.1]))  # "b" (least recently scored) goes, not "a"
    assert t.entities == 3 and t.evictions == 1
    assert t.get("b") is None and t.get("a") is not None
    t.judge(["e", "f", "g"], np.array([0.1, 0.1, 0.1]))  # now "a" goes too
    assert t.get("a") is None and t.evictions == 4
    # Back, it starts over from the warm start: no cooldown left.
    assert t.judge(["a"], np.array([50.0]))[0].tolist() == [True]
    t.clear()
    assert t.entities == 0


def test_a_new_entity_starts_from_the_warm_start() -> None:
    settings = SmoothingSettings(ewma_alpha=0.5)
    t = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 10, WARM, settings)
    t.judge(["old"] * 500, np.full(500, 0.01))  # "old" learns a low threshold
    _, used = t.judge(["old", "new"], np.array([0.01, 0.01]))
    start = RollingQuantileThreshold(WINDOW, QUANTILE, MIN_SAMPLES, WARM).value
    assert used[0] < start and used[1] == start
    assert t.last_smoothed[1] == pytest.approx(0.5 * 0.01 + 0.5 * float(np.median(WARM)))
    # Without a warm start, an entity stays silent until it has min_samples scores.
    cold = EntitySmoothedThresholds(WINDOW, QUANTILE, MIN_SAMPLES, 10, None, SmoothingSettings())
    flags, used = cold.judge(["x"] * MIN_SAMPLES, np.full(MIN_SAMPLES, 9.0))
    assert not flags.any() and np.isinf(used).all()
    assert np.isfinite(cold.judge(["x"], np.array([9.0]))[1]).all()


def test_memory_per_entity_is_about_what_the_docs_say() -> None:
    for settings in (
        SmoothingSettings(ewma_alpha=0.1),
        SmoothingSettings(mean_rows=10),
        SmoothingSettings(ewma_alpha=0.1, median_cap=20.0),  # a second window: raw scores
    ):
        t = EntitySmoothedThresholds(200, QUANTILE, 50, 10_000, WARM, settings)
        keys = [f"c-{i:05d}" for i in range(2000)]
        t.judge(keys[:1], np.ones(1))  # the template and imports are not per entity
        tracemalloc.start()
        t.judge(keys, np.ones(2000))
        t.judge(keys, np.ones(2000))
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert 0.75 < held / 2000 / t.bytes_per_entity < 1.25


# -- in the daemon ----------------------------------------------------------------------------

SPIKES = {300: "c-spike-a", 320: "c-spike-b", 500: "c-spike-a"}
COOLDOWN = {"ewma_alpha": 0.5, "cooldown_rows": 100}


def settings(
    smoothing: dict[str, Any] | None, per_entity: bool = True, **sections: Any
) -> Settings:
    raw: dict[str, Any] = {
        "profile": "orders",
        "kafka": {"input_topic": "in", "alert_topic": "a", "dead_letter_topic": "d"},
        "model": {"bundle": "unused"},
        "threshold": {
            "quantile": 0.999,
            "min_samples": 100,
            "per_entity": per_entity,
            "entity_window_size": 100,
            "entity_min_samples": 20,
            **sections.pop("threshold", {}),
        },
        **sections,
    }
    if smoothing is not None:
        raw["smoothing"] = smoothing
    return from_mapping(raw)


def stream(n: int = 700) -> list[RawMessage]:
    """Simulated orders of a few customers (each one many rows); absurd orders at SPIKES."""
    out = []
    for i, (event, _) in enumerate(islice(simulate("orders", 21, 0.0), n)):
        doc = msgspec.to_builtins(event)
        doc["customer_id"] = f"c-{i % 9}"
        if i in SPIKES:
            doc.update(amount=250_000.0, items=2, customer_id=SPIKES[i])
        out.append(RawMessage("orders", 0, i, None, msgspec.json.encode(doc), 0))
    return out


def test_the_daemon_smooths_per_entity(orders_bundle: bundles.Bundle) -> None:
    """A's spike no longer silences B's: each customer has its own cooldown; and every alert
    is the one a SmoothedThreshold per customer gives, with its threshold as `threshold`."""
    s = settings(COOLDOWN)
    p = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    assert type(p.threshold) is RollingQuantileThreshold  # global: raw scores, reported
    assert isinstance(p.state.thresholds, EntitySmoothedThresholds)
    messages = stream()
    alerts: list[Alert] = []
    reference: dict[str, SmoothedThreshold] = {}
    expected: dict[int, float] = {}
    t, smoothing = s.threshold, s.smoothing
    assert smoothing is not None
    for i in range(0, len(messages), 50):
        result = p.process(messages[i : i + 50])
        alerts += result.alerts
        keys = [msgspec.json.decode(m.value)["customer_id"] for m in result.scored]
        for key in dict.fromkeys(keys):
            rows = np.flatnonzero(np.array(keys) == key)
            ref = reference.setdefault(
                key,
                SmoothedThreshold(
                    t.entity_window_size,
                    t.quantile,
                    t.entity_min_samples,
                    orders_bundle.warm_start,
                    smoothing,
                ),
            )
            bar = ref.value
            for r in rows[ref.judge(result.scores[rows])]:
                expected[result.scored[r].offset] = bar
    assert {a.source.offset: a.threshold for a in alerts} == expected
    # c-spike-b alerts 20 rows after c-spike-a; c-spike-a's next spike is its second row,
    # inside its own cooldown.
    assert {300, 320} <= set(expected) and 500 not in expected
    assert p.state.entities()["thresholds"] == 11  # 9 customers and two spiking ones
    # One smoothing state for the whole stream: B's spike falls in A's cooldown.
    one = build_pipeline(settings(COOLDOWN, per_entity=False), orders_bundle, p.scorer)
    assert 320 not in offsets(feed(one, messages))


def test_a_replay_rebuilds_each_entitys_smoothing_state(orders_bundle: bundles.Bundle) -> None:
    """Per-entity smoothing state follows the partitions, like EntityThresholds' rings: a
    replay (the restore after a move) feeds it, leaves the global threshold alone."""
    s = settings(COOLDOWN, incidents={"enabled": True})
    messages = stream()
    straight = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    expected = feed(straight, messages[:310]) + feed(straight, messages[310:])
    p = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    assert p.state.needs_history
    head = feed(p, messages[:310])  # c-spike-a cools down after 300
    p.state.clear()  # the partition moved away and back
    before = p.threshold.value
    for i in range(0, 300, 50):  # the restore re-reads the tail, in the same batches
        assert p.process(messages[i : i + 50], replay=True).alerts == []
    p.process(messages[300:310], replay=True)
    assert p.threshold.value == before
    strip = [msgspec.structs.replace(a, detected_at="") for a in head + feed(p, messages[310:])]
    assert strip == [msgspec.structs.replace(a, detected_at="") for a in expected]
    # Without the replay, the customers start over from the warm start and decide otherwise.
    cold = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    feed(cold, messages[:310])
    cold.state.clear()
    assert offsets(feed(cold, messages[310:])) != offsets(expected[len(head) :])


def test_needs_history_unless_nothing_carries_over(orders_bundle: bundles.Bundle) -> None:
    scorer = orders_bundle.load_scorer()
    stateless = settings({"frozen": True}, threshold={"learn": False})
    assert not build_pipeline(stateless, orders_bundle, scorer).state.needs_history
    for smoothing in ({"frozen": True, "ewma_alpha": 0.5}, {"min_consecutive": 2}, {}):
        s = settings(smoothing, threshold={"learn": bool(smoothing == {})})
        assert build_pipeline(s, orders_bundle, scorer).state.needs_history


def test_control_judges_the_entitys_smoothed_score(orders_bundle: bundles.Bundle) -> None:
    """A fixed override is compared with the entity's smoothed score (the one its threshold
    compared), a feedback factor raises the entity's own bar and can only drop alerts."""
    messages = stream()
    plain = build_pipeline(
        settings(None, per_entity=False), orders_bundle, orders_bundle.load_scorer()
    )
    raw = plain.process(messages[:301]).scores[300]  # c-spike-a's spike, unsmoothed
    d = Detector(settings(COOLDOWN, control={"topic": "ctl"}))
    d._serve(orders_bundle, orders_bundle.load_scorer())
    assert d._control is not None and d._pipeline is not None
    # Between the entity's smoothed spike (half of it plus half the warm-start median) and
    # its raw score: compared with the smoothed one, no alert.
    value = 0.75 * raw
    d._control.apply_control(
        b'{"action": "set_entity_threshold", "entity": "c-spike-a", "value": %f}' % value
    )
    got = offsets(feed(d._pipeline, messages))
    assert 300 not in got and 320 in got
    d._serve(orders_bundle, orders_bundle.load_scorer())  # fresh state, same control
    d._control.apply_control(b'{"action": "clear_entity_threshold", "entity": "c-spike-a"}')
    d._control.apply_feedback(b'{"type": "false_positive", "entity": "c-spike-b"}', None)
    alerts = feed(d._pipeline, messages)
    assert 300 in offsets(alerts) and 320 in offsets(alerts)
    entities = d._pipeline.state.thresholds
    assert isinstance(entities, EntitySmoothedThresholds)
    b = next(a for a in alerts if a.source.offset == 320)
    a = next(a for a in alerts if a.source.offset == 300)
    factor = d.settings.control.false_positive_factor
    # The same warm start, so both customers' first rows face the same bar.
    assert b.threshold == pytest.approx(factor * a.threshold)


def test_an_alert_carries_its_entitys_smoothed_score(orders_bundle: bundles.Bundle) -> None:
    """Per entity too: `score` is the entity's smoothed score, above its own `threshold`,
    `raw_score` the event's own; an incident's `max_score` is on the same scale."""
    s = settings({"ewma_alpha": 0.1}, incidents={"enabled": True})
    p = build_pipeline(s, orders_bundle, orders_bundle.load_scorer())
    entities = p.state.thresholds
    assert isinstance(entities, EntitySmoothedThresholds)
    messages = stream()
    alerts, incidents = [], []
    for i in range(0, len(messages), 50):
        result = p.process(messages[i : i + 50])
        row = {m.offset: r for r, m in enumerate(result.scored)}
        for a in result.alerts:
            r = row[a.source.offset]
            assert a.score == entities.last_smoothed[r] > a.threshold
            assert a.raw_score == float(result.scores[r]) != a.score
        alerts += result.alerts
        incidents += result.incidents
    assert set(SPIKES) <= set(offsets(alerts))
    assert incidents and all(m.max_score > m.threshold for m in incidents)
    top = {a.alert_id: a.score for a in alerts}
    assert all(m.max_score >= top[m.first_alert_id] for m in incidents)
