import math
from itertools import pairwise

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.aggregates import AggregateState
from streamer.features import FeatureSpec, LabelRate, Rolling
from streamer.labels import LabelStore, deliveries

H = 3600.0
SPEC = FeatureSpec(
    profile="t",
    entity_field="user",
    time_field="ts",
    time_format="epoch_s",
    id_field="id",
    columns=[
        LabelRate(key="shop", windows_seconds=[H, 3 * H], delay_seconds=2 * H,
                  stats=["count", "confirmed", "rate"]),
        Rolling(field="amount", windows_seconds=[H], stats=["count"], key="shop"),
        LabelRate(windows_seconds=[H], delay_seconds=0.0, stats=["rate"]),
    ],
)  # fmt: skip
Event = SPEC.event_type()


def brute_force(events: list, delivered_before: list[list[int]]) -> np.ndarray:
    """SPEC's label features from the definition: for event i, the events before it and the
    labeled events among them (`delivered_before[i]`: rows whose labels were delivered before
    it, each counted once however often), counted by hour of event time."""

    def hour(t: float) -> int:
        return math.floor(t / H)

    def label_rate(i: int, key: str, delay_h: int, width_h: int, stats: list[str]) -> list[float]:
        e = hour(events[i].ts) - delay_h
        mine = [
            j
            for j in range(i)
            if getattr(events[j], key) == getattr(events[i], key)
            and e - width_h <= hour(events[j].ts) < e
        ]
        count = len(mine)
        hit = sum(1 for j in set(delivered_before[i]) if j in mine)
        got = {
            "count": float(count),
            "confirmed": float(hit),
            "rate": min(1.0, hit / count) if count else 0.0,
        }
        return [got[s] for s in stats]

    rows = []
    for i, ev in enumerate(events):
        row: list[float] = []
        row += label_rate(i, "shop", 2, 1, ["count", "confirmed", "rate"])
        row += label_rate(i, "shop", 2, 3, ["count", "confirmed", "rate"])
        row.append(float(sum(1 for p in events[:i] if p.shop == ev.shop and ev.ts - H < p.ts)))
        row += label_rate(i, "user", 0, 1, ["rate"])
        rows.append(row)
    return np.array(rows).reshape(len(events), len(SPEC.feature_names()))


def run(state: AggregateState, events: list, labels: list[tuple[int, np.ndarray]], sizes: list):
    """Events in chunks of `sizes`, cut further where labels are delivered."""
    cuts = {0, len(events)} | {i for i, _ in labels}
    start = 0
    for size in sizes:
        start += size
        cuts.add(min(start, len(events)))
    due = dict(labels)
    parts = []
    points = sorted(cuts)
    for a, b in pairwise(points):
        for j in due.get(a, []):
            state.confirm(events[j])
        parts.append(state.update(events[a:b]))
    return np.vstack(parts) if parts else np.empty((0, len(SPEC.feature_names())))


steps = st.sampled_from([0.0, 1.0, 600.0, 1800.0, 3599.0, 3600.0, 7200.0, 20000.0, 30000.0])
stream = st.lists(
    st.tuples(st.sampled_from("abc"), st.sampled_from("xyz"), steps, st.booleans()),
    min_size=1,
    max_size=80,
)


def twice(labels: list[tuple[int, np.ndarray]], n: int, later: int) -> list[tuple[int, np.ndarray]]:
    """Every label delivered a second time, `later` events after the first (when the stream
    is still going): at-least-once delivery."""
    due: dict[int, list[int]] = {}
    for i, js in labels:
        due.setdefault(i, []).extend(js.tolist())
        if i + later < n:
            due.setdefault(i + later, []).extend(js.tolist())
    return [(i, np.array(due[i], dtype=int)) for i in sorted(due)]


@settings(max_examples=80, deadline=None)
@given(
    stream,
    st.sampled_from([0.0, 1800.0, 2 * H, 10000.0]),
    st.lists(st.integers(0, 9)),
    st.sampled_from([None, 0, 1, 7]),
)
def test_stream_equals_brute_force(
    rows: list, delay: float, sizes: list[int], repeat_after: int | None
) -> None:
    t, events, positive = 1000.0, [], []
    for i, (user, shop, step, anomalous) in enumerate(rows):
        t += step
        events.append(Event(id=f"e{i}", user=user, shop=shop, ts=t, amount=1.0))
        positive.append(anomalous)
    seconds = np.array([e.ts for e in events])
    labels = deliveries(seconds, np.array(positive), delay)
    if repeat_after is not None:  # each label delivered twice: it still counts once
        labels = twice(labels, len(events), repeat_after)
    before: list[list[int]] = [[] for _ in events]
    for i, js in labels:
        for k in range(i, len(events)):
            before[k] += js.tolist()
    want = brute_force(events, before)
    got = run(AggregateState(SPEC), events, labels, sizes)
    np.testing.assert_array_equal(got, want)
    # Idle eviction (gaps of 30000 s pass the 6 h horizon) changes no value either.
    small = AggregateState(SPEC, max_entities=6)
    np.testing.assert_array_equal(run(small, events, labels, [3]), want)


# What happens to a row's label after its delivery: kept; withdrawn (once, or twice: the
# second finds nothing); withdrawn then labeled again; or, for a row never labeled, a
# withdrawal of nothing.
fates = st.sampled_from(["keep", "withdraw", "withdraw twice", "withdraw relabel"])


def corrections(
    labels: list[tuple[int, np.ndarray]], fate: list[str], gaps: list[int], n: int
) -> list[tuple[int, list[tuple[str, int]]]]:
    """Label deliveries plus their corrections, as [(i, [(op, row)])]: ops due just before
    event i, in order. A row's withdrawal comes `gap` events after its label (0: at the same
    point, after it), a relabel `gap` events after the withdrawal; ops due after the last
    event are not delivered."""
    due: list[tuple[int, int, str, int]] = []  # (i, stage, op, row)
    labeled = {int(j): i for i, js in labels for j in js}
    for j, i in labeled.items():
        due.append((i, 0, "label", j))
    for j, what in enumerate(fate):
        gap = gaps[j % len(gaps)] if gaps else 0
        start = labeled.get(j, j + 1)  # a row never labeled: its "withdrawal" after it
        if what == "keep":
            continue
        due.append((start + gap, 1, "withdraw", j))
        if what == "withdraw twice":
            due.append((start + 2 * gap, 2, "withdraw", j))
        elif what == "withdraw relabel" and j in labeled:
            due.append((start + 2 * gap, 2, "label", j))
    out: dict[int, list[tuple[str, int]]] = {}
    for i, _, op, j in sorted(due):
        if i < n:
            out.setdefault(i, []).append((op, j))
    return sorted(out.items())


@settings(max_examples=80, deadline=None)
@given(
    stream,
    st.sampled_from([0.0, 1800.0, 2 * H, 10000.0]),
    st.lists(fates, min_size=1),
    st.lists(st.integers(0, 6)),
    st.lists(st.integers(0, 9)),
)
def test_withdrawals_leave_the_features_of_the_labels_standing(
    rows: list, delay: float, fate: list[str], gaps: list[int], sizes: list[int]
) -> None:
    """Any sequence of labels, withdrawals and relabels gives, for every event, the features
    of the net set of labels standing when it is processed: as if only those were sent."""
    t, events, positive = 1000.0, [], []
    for i, (user, shop, step, anomalous) in enumerate(rows):
        t += step
        events.append(Event(id=f"e{i}", user=user, shop=shop, ts=t, amount=1.0))
        positive.append(anomalous)
    n = len(events)
    fate = [fate[j % len(fate)] for j in range(n)]
    seconds = np.array([e.ts for e in events])
    ops = corrections(deliveries(seconds, np.array(positive), delay), fate, gaps, n)
    standing: set[int] = set()
    before: list[list[int]] = []
    due = dict(ops)
    for i in range(n):
        for op, j in due.get(i, []):
            (standing.add if op == "label" else standing.discard)(j)
        before.append(sorted(standing))
    want = brute_force(events, before)
    for state, chunks in (
        (AggregateState(SPEC), sizes),
        (AggregateState(SPEC, max_entities=6), [3]),
    ):
        cuts = {0, n} | set(due)
        start = 0
        for size in chunks:
            start += size
            cuts.add(min(start, n))
        parts = []
        for a, b in pairwise(sorted(cuts)):
            for op, j in due.get(a, []):
                (state.confirm if op == "label" else state.withdraw)(events[j])
            parts.append(state.update(events[a:b]))
        np.testing.assert_array_equal(np.vstack(parts), want)


def test_a_withdrawal_takes_back_exactly_one_label() -> None:
    store = LabelStore(key_fields={"k"}, horizon_seconds=2 * H)
    store.add("k", 1, 10 * H, "a")
    store.add("k", 1, 10 * H + 60.0, "b")
    store.add("k", 1, 11 * H, "c")
    assert store.withdraw("k", 1, "a") == "withdrawn"
    assert store.confirmed("k", 1, [(10, 11), (11, 12)]) == [1, 1]
    assert store.withdraw("k", 1, "a") == "unknown"  # withdrawn already
    assert store.withdraw("k", 1, "z") == store.withdraw("k", 2, "b") == "unknown"  # never held
    assert store.withdraw("j", 1, "b") == "unused"
    assert store.add("k", 1, 10 * H, "a") == "counted"  # labeled again: counts again
    assert store.add("k", 1, 10 * H, "a") == "duplicate"
    assert store.confirmed("k", 1, [(10, 11), (11, 12)]) == [2, 1]
    for i in "abc":
        assert store.withdraw("k", 1, i) == "withdrawn"
    assert store.keys == 0 and store.withdrawn == 4  # an empty key is dropped, not kept
    # Gone with its hour (a newer label pushed it past the horizon): nothing to withdraw.
    store.add("k", 1, 10 * H, "old")
    store.add("k", 1, 13 * H, "new")
    assert store.withdraw("k", 1, "old") == "unknown"
    assert store.confirmed("k", 1, [(0, 100)]) == [1]


def test_deliveries_never_early() -> None:
    rng = np.random.default_rng(0)
    seconds = np.cumsum(rng.choice([0.0, 5.0, 60.0], 500))
    seconds[200:210] -= 30.0  # a few late events: the clock is the latest time seen
    positive = rng.random(500) < 0.2
    delivered = deliveries(seconds, positive, 100.0)
    clock = np.maximum.accumulate(seconds)
    seen = [j for _, js in delivered for j in js]
    assert len(seen) == len(set(seen)) and all(positive[seen])
    assert [i for i, _ in delivered] == sorted({i for i, _ in delivered})
    for i, js in delivered:
        assert (js < i).all() and (clock[i] >= seconds[js] + 100.0).all()
        assert (i == js + 1).any() or (clock[i - 1] < seconds[js] + 100.0).any()  # not late
    # Every positive label due before the stream ends is delivered.
    due = seconds[positive] + 100.0
    assert len(seen) == int((due <= clock[-1]).sum())


def test_labels_outlive_clear_and_reach_later_events() -> None:
    state = AggregateState(SPEC)
    day = [Event(id=m, user="u", shop="s", ts=float(m * 600), amount=1.0) for m in range(6)]
    state.update(day)  # six events in hour 0
    state.confirm(day[0])
    state.confirm(day[1])
    state.clear()  # a partition move: events are replayed, labels are not
    state.update(day)
    x = state.update([Event(id=6, user="u", shop="s", ts=2 * H + 3 * H, amount=1.0)])
    # The 1h window 2h ago is hour 2..3 away: hour 0 is in the 3h window only.
    assert x[0, :6].tolist() == [0.0, 0.0, 0.0, 6.0, 2.0, pytest.approx(2 / 6)]
    assert state.labels.keys == 2  # ("shop", "s") and ("user", "u"): both have labels
    assert state.confirm(day[1]) == 0  # confirmed again: counted already, for both keys
    assert state.confirm(Event(id=99, user="u", shop="s", ts=0.0, amount=1.0)) == 2


def test_store_bounds() -> None:
    store = LabelStore(key_fields={"k"}, horizon_seconds=2 * H, max_keys=2)
    assert store.add("k", 1, 10 * H, "a") == store.add("k", 1, 8 * H, "b") == "counted"
    assert store.add("k", 1, 7 * H, "c") == "stale"  # more than a horizon before the newest
    assert store.add("k", 1, 13 * H, "d") == "counted"  # pushes hours 8 and 10 out
    assert store.confirmed("k", 1, [(0, 100)]) == [1]
    assert store.add("k", 1, math.nan, "e") == "stale" and store.dropped == 2
    assert store.add("j", 1, 13 * H, "f") == "unused"
    store.add("k", 2, 0.0, "g")
    store.add("k", 3, 0.0, "h")
    assert store.keys == 2 and store.evictions == 1
    assert store.confirmed("k", 1, [(0, 100)]) == [0]  # the least recently labeled went


def test_a_label_counts_once_per_event() -> None:
    store = LabelStore(key_fields={"k"}, horizon_seconds=2 * H)
    assert store.add("k", 1, 10 * H, "a") == "counted"
    assert store.add("k", 1, 10 * H, "a") == "duplicate"  # redelivered
    assert store.add("k", 1, 10 * H + 60.0, "a") == "duplicate"  # whatever its time says
    assert store.add("k", 1, 10 * H, "b") == "counted"  # another event of that hour
    assert store.add("k", 2, 10 * H, "a") == "counted"  # ids are per key
    assert store.confirmed("k", 1, [(10, 11)]) == [2] and store.duplicates == 2


def test_a_repeat_older_than_the_horizon_is_stale_not_counted_again() -> None:
    """The ids go with their hour: once a newer label pushed it out, a repeat of it is older
    than the horizon, and stays out, like any label that old."""
    store = LabelStore(key_fields={"k"}, horizon_seconds=2 * H)
    store.add("k", 1, 10 * H, "a")
    store.add("k", 1, 11 * H, "b")
    assert store.add("k", 1, 13 * H, "c") == "counted"  # hour 10 goes, and id "a" with it
    assert store.add("k", 1, 10 * H, "a") == "stale" and store.dropped == 1
    assert store.add("k", 1, 11 * H, "b") == "duplicate"  # hour 11 is still held
    assert store.confirmed("k", 1, [(0, 100)]) == [2]
    held = store._keys[("k", 1)]
    assert sorted(held.hour_of) == ["b", "c"] and sorted(held.ids) == [11, 13]  # bounded


def test_an_evicted_key_counts_a_repeat_anew() -> None:
    """A key evicted for capacity takes its counts with it: a repeat then counts once."""
    store = LabelStore(key_fields={"k"}, horizon_seconds=2 * H, max_keys=1)
    store.add("k", 1, 10 * H, "a")
    store.add("k", 2, 10 * H, "b")  # evicts key 1
    assert store.add("k", 1, 10 * H, "a") == "counted"
    assert store.confirmed("k", 1, [(0, 100)]) == [1] and store.evictions == 2


def test_names_and_event_type() -> None:
    assert SPEC.feature_names() == [
        "shop.label_count(1h,-2h)", "shop.label_confirmed(1h,-2h)", "shop.label_rate(1h,-2h)",
        "shop.label_count(3h,-2h)", "shop.label_confirmed(3h,-2h)", "shop.label_rate(3h,-2h)",
        "shop.count(amount,1h)", "user.label_rate(1h,-0d)",
    ]  # fmt: skip
    assert SPEC.stateful and SPEC.labeled and not FeatureSpec("p", "e", "t", [Rolling(field="x",
        windows_seconds=[1.0])]).labeled  # fmt: skip
    again = msgspec.json.decode(msgspec.json.encode(SPEC), type=FeatureSpec)
    assert again == SPEC
    event = msgspec.json.decode(
        b'{"id": 3, "user": 1, "shop": 2, "ts": 0, "amount": 1}', type=Event
    )
    assert event.shop == 2


@pytest.mark.parametrize(
    ("column", "match"),
    [
        ({"windows_seconds": []}, "at least one window"),
        ({"windows_seconds": [1800]}, "whole hours"),
        ({"windows_seconds": [3600], "delay_seconds": 60}, "whole hours"),
        ({"windows_seconds": [3600], "delay_seconds": -3600}, "whole hours"),
        ({"windows_seconds": [0]}, "> 0"),
        ({"windows_seconds": [3600, 3600]}, "duplicate"),
        ({"windows_seconds": [3600], "stats": ["mean"]}, "stats"),
        ({"windows_seconds": [3600], "stats": ["rate", "rate"]}, "distinct"),
    ],
)
def test_bad_columns_are_rejected(column: dict, match: str) -> None:
    doc = {"profile": "p", "entity_field": "e", "time_field": "t",
           "columns": [{"kind": "label_rate", **column}]}  # fmt: skip
    with pytest.raises((msgspec.ValidationError, ValueError), match=match):
        msgspec.convert(doc, FeatureSpec)


def test_label_rate_needs_an_id_field() -> None:
    doc = {"profile": "p", "entity_field": "e", "time_field": "t",
           "columns": [{"kind": "label_rate", "windows_seconds": [3600]}]}  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="id_field"):
        msgspec.convert(doc, FeatureSpec)
    assert msgspec.convert({**doc, "id_field": "tx"}, FeatureSpec).labeled


def test_label_keys_and_their_evictions_are_exported() -> None:
    from prometheus_client import CollectorRegistry

    from streamer.metrics import Metrics
    from streamer.state import EntityState

    store = LabelStore(max_keys=2)
    state = EntityState(aggregates=AggregateState(SPEC, labels=store))
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for shop in ("a", "b", "c"):  # three shops' labels: one key too many
        state.aggregates.confirm(Event(id=shop, user="u", shop=shop, ts=0.0, amount=1.0))
    metrics.record_state(state)
    sample = registry.get_sample_value
    assert sample("anomaly_state_entities", {"kind": "labels"}) == 2 == store.keys
    assert sample("anomaly_state_evictions_total", {"kind": "labels", "reason": "capacity"}) == 2
    # Without label_rate columns nothing reads the store: no labels kind.
    plain = FeatureSpec(
        profile="t", entity_field="user", time_field="ts", time_format="epoch_s",
        columns=[Rolling(field="amount", windows_seconds=[H], stats=["count"])],
    )  # fmt: skip
    assert "labels" not in EntityState(aggregates=AggregateState(plain)).entities()
