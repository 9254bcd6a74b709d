import math
from datetime import UTC, datetime

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.aggregates import AggregateState
from streamer.features import (
    FeatureSpec,
    Log1p,
    Rolling,
    SincePrevious,
    build_features,
)

WINDOWS = [60.0, 90.0, 3600.0]
CAP = 1800.0
SPEC = FeatureSpec(
    profile="t",
    entity_field="user",
    time_field="ts",
    time_format="epoch_s",
    columns=[
        Rolling(field="amount", windows_seconds=WINDOWS),
        SincePrevious(cap_seconds=CAP),
        Rolling(
            field="qty",
            windows_seconds=[30.0],
            key="shop",
            stats=["mean", "count", "median", "median_ratio"],
        ),
        SincePrevious(key="shop", cap_seconds=60.0),
    ],
)
Event = SPEC.event_type()


def brute_force(events: list) -> np.ndarray:
    """SPEC's stateful features straight from the definitions: O(n^2), no state at all."""

    def rolling(i: int, key: str, field: str, window: float, stats: list[str]) -> list[float]:
        e = events[i]
        value = getattr(e, field)
        seen = [
            getattr(p, field)
            for p in events[:i]
            if getattr(p, key) == getattr(e, key)
            and e.ts - window < p.ts <= e.ts
            and abs(getattr(p, field)) <= 1e150
        ]
        mean = float(np.mean(seen)) if seen else value
        median = float(np.median(seen)) if seen else value
        got = {
            "median": median,
            "median_ratio": value / median if abs(median) > 1e-12 else 1.0,
            "count": float(len(seen)),
            "mean": mean,
            "std": float(np.std(seen)) if len(seen) >= 2 else 0.0,
            "ratio": value / mean if abs(mean) > 1e-12 else 1.0,
        }
        return [got[s] for s in stats]

    def since(i: int, key: str, cap: float) -> float:
        e = events[i]
        before = [p.ts for p in events[:i] if getattr(p, key) == getattr(e, key)]
        return math.log1p(min(e.ts - before[-1], cap) if before else cap)

    rows = []
    for i in range(len(events)):
        row: list[float] = []
        for w in WINDOWS:
            row += rolling(i, "user", "amount", w, ["count", "mean", "std", "ratio"])
        row.append(since(i, "user", CAP))
        row += rolling(i, "shop", "qty", 30.0, ["mean", "count", "median", "median_ratio"])
        row.append(since(i, "shop", 60.0))
        rows.append(row)
    return np.array(rows).reshape(len(events), len(SPEC.feature_names()))


def in_chunks(state: AggregateState, events: list, sizes: list[int]) -> np.ndarray:
    parts, start = [], 0
    for size in [*sizes, len(events)]:
        parts.append(state.update(events[start : start + size]))
        start += size
    return np.vstack(parts)


def close(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * scale)


# Time steps include ties and steps that land exactly on a window's edge.
steps = st.sampled_from([0.0, 0.0, 0.25, 1.0, 10.0, 29.5, 30.0, 60.0, 90.0, 1000.0, 5000.0])
values = st.one_of(st.floats(0.01, 1e4), st.sampled_from([1.0, 2.5, 100.0]))
stream = st.lists(
    st.tuples(st.sampled_from("abcd"), st.sampled_from("xy"), steps, values, values),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(stream, st.lists(st.integers(0, 15), max_size=8))
def test_stream_equals_brute_force_and_one_batch(rows: list, sizes: list[int]) -> None:
    t, events = 1000.0, []
    for user, shop, step, amount, qty in rows:
        t += step
        events.append(Event(user=user, shop=shop, ts=t, amount=amount, qty=qty))
    chunked = in_chunks(AggregateState(SPEC), events, sizes)
    once = AggregateState(SPEC).update(events)
    assert np.array_equal(chunked, once)
    close(once, brute_force(events), scale=1e4)


def test_long_stream_stays_exact_through_offsets_and_regime_changes() -> None:
    # Large offsets with tiny spread, then a jump: the cases where naive sums lose digits.
    rng = np.random.default_rng(7)
    n = 1500
    level = np.where(np.arange(n) < n // 2, 1e6, 10.0)
    amounts = level + rng.normal(0.0, 1e-3, n)
    times = np.cumsum(rng.exponential(20.0, n))
    users = rng.choice(["a", "b"], n)
    events = [
        Event(user=str(u), shop="s", ts=float(t), amount=float(a), qty=1.0)
        for u, t, a in zip(users, times, amounts, strict=True)
    ]
    got = in_chunks(AggregateState(SPEC), events, [1, 7, 300, 2])
    want = brute_force(events)
    std = [i for i, name in enumerate(SPEC.feature_names()) if name.startswith("user.std")]
    np.testing.assert_allclose(got[:, std], want[:, std], rtol=1e-9, atol=1e-15)
    close(got, want, scale=1e6)


def test_names_round_trip_and_event_type() -> None:
    again = msgspec.json.decode(msgspec.json.encode(SPEC), type=FeatureSpec)
    assert again == SPEC
    assert again.stateful and not FeatureSpec("p", "e", "t", [Log1p(field="x")]).stateful
    names = SPEC.feature_names()
    assert names[:5] == [
        "user.count(amount,1m)", "user.mean(amount,1m)", "user.std(amount,1m)",
        "user.ratio(amount,1m)", "user.count(amount,90s)",
    ]  # fmt: skip
    assert names[8:13] == ["user.count(amount,1h)", *names[9:12], "user.since_previous"]
    assert names[13:] == [
        "shop.mean(qty,30s)", "shop.count(qty,30s)", "shop.median(qty,30s)",
        "shop.median_ratio(qty,30s)", "shop.since_previous",
    ]  # fmt: skip
    # Without `stats`, the four that existed before the medians: old specs keep their names.
    assert Rolling(field="x", windows_seconds=[60.0]).stats == ["count", "mean", "std", "ratio"]
    assert SPEC.unit_names() == names
    assert SPEC.standardized().all() and SPEC.standardized().size == len(names)
    week = Rolling(field="x", windows_seconds=[300, 86400, 604800, 1.5, 100000], stats=["mean"])
    spec = FeatureSpec("p", "e", "t", [week])
    assert spec.feature_names() == [
        "e.mean(x,5m)", "e.mean(x,1d)", "e.mean(x,7d)", "e.mean(x,1.5s)", "e.mean(x,100000s)",
    ]  # fmt: skip
    decoder = msgspec.json.Decoder(SPEC.event_type())
    event = decoder.decode(b'{"user": 7, "shop": "s", "ts": 1, "amount": 2, "qty": 1.5}')
    assert (event.user, event.shop, event.amount) == (7, "s", 2.0)
    with pytest.raises(msgspec.ValidationError, match="shop"):
        decoder.decode(b'{"user": 7, "ts": 1, "amount": 2, "qty": 1.5}')


@pytest.mark.parametrize(
    ("column", "match"),
    [
        ({"kind": "rolling", "field": "x", "windows_seconds": [0]}, "rolling column of 'x'"),
        ({"kind": "rolling", "field": "x", "windows_seconds": [60, 60]}, "duplicate windows"),
        ({"kind": "rolling", "field": "x", "windows_seconds": []}, "at least one window"),
        ({"kind": "rolling", "field": "x", "windows_seconds": [9], "stats": []}, "one stat"),
        ({"kind": "since_previous", "cap_seconds": -1}, "cap_seconds"),
    ],
)
def test_bad_stateful_columns_are_rejected(column: dict, match: str) -> None:
    doc = {"profile": "p", "entity_field": "e", "time_field": "t", "columns": [column]}
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.convert(doc, FeatureSpec)
    fields = {k: v for k, v in column.items() if k != "kind"}
    with pytest.raises(ValueError, match=match):  # built directly, in code
        (Rolling if column["kind"] == "rolling" else SincePrevious)(**fields)


def test_capacity_is_a_hard_bound() -> None:
    state = AggregateState(SPEC, max_entities=5)
    rng = np.random.default_rng(1)
    for i in range(300):
        user, shop = f"u{rng.integers(20)}", f"s{rng.integers(3)}"
        state.update([Event(user=user, shop=shop, ts=float(i), amount=1.0, qty=1.0)])
        assert state.entities <= 5
    assert state.evictions["capacity"] > 0 and state.evictions["idle"] == 0
    state.clear()
    assert state.entities == 0 and state.evictions["capacity"] > 0


def test_idle_eviction_changes_no_value() -> None:
    # Bursts of many users separated by gaps longer than every window and cap.
    rng = np.random.default_rng(3)
    events, t = [], 0.0
    for burst in range(6):
        t += 4000.0 if burst % 2 else 20.0  # some gaps shorter than the 1h window
        for _ in range(40):
            t += float(rng.choice([0.0, 1.0, 15.0]))
            user = f"u{rng.integers(30)}" if burst % 3 else f"v{burst}-{rng.integers(10)}"
            shop, amount = f"s{rng.integers(4)}", float(rng.uniform(1, 9))
            events.append(Event(user=user, shop=shop, ts=t, amount=amount, qty=2.0))
    state = AggregateState(SPEC)
    got = in_chunks(state, events, [5, 50, 1])
    assert state.evictions["idle"] > 0 and state.evictions["capacity"] == 0
    close(got, brute_force(events), scale=10.0)


def test_late_events_within_partitions_that_lag() -> None:
    # Two partitions, each in time order, one lagging the other by less than the horizon.
    events = []
    for i in range(200):
        lead, lag = 3000.0 + 7.0 * i, 7.0 * i
        events.append(Event(user=f"a{i % 7}", shop="p", ts=lead, amount=1.0 + i % 5, qty=1.0))
        events.append(Event(user=f"b{i % 5}", shop="q", ts=lag, amount=2.0 + i % 3, qty=1.0))
    close(AggregateState(SPEC).update(events), brute_force(events), scale=10.0)


def test_bad_values_do_not_poison_later_features() -> None:
    clean = [Event(user="a", shop="s", ts=10.0 * i, amount=5.0 + i, qty=1.0) for i in range(8)]
    for bad in (math.nan, math.inf, -math.inf, 1e300):
        dirty = [*clean[:4], Event(user="a", shop="s", ts=35.0, amount=bad, qty=bad), *clean[4:]]
        got = AggregateState(SPEC).update(dirty)
        want = AggregateState(SPEC).update(clean)
        rolling = [i for i, name in enumerate(SPEC.feature_names()) if "since" not in name]
        assert np.array_equal(np.delete(got, 4, axis=0)[:, rolling], want[:, rolling])
        # The bad event is still an event: the next one is 5 s after it.
        assert got[5, 12] == pytest.approx(math.log1p(5.0))
        assert np.isfinite(got[4]).all() == (bad == 1e300)


def test_non_finite_time_leaves_the_state_alone() -> None:
    state = AggregateState(SPEC)
    first = state.update([Event(user="a", shop="s", ts=0.0, amount=1.0, qty=1.0)])
    nan = state.update([Event(user="a", shop="s", ts=math.nan, amount=1.0, qty=1.0)])
    assert np.isnan(nan).all() and np.isfinite(first).all()
    after = state.update([Event(user="a", shop="s", ts=30.0, amount=3.0, qty=1.0)])
    assert after[0, 0] == 1.0 and after[0, 12] == pytest.approx(math.log1p(30.0))


def test_late_and_far_future_times() -> None:
    state = AggregateState(SPEC)
    x = state.update(
        [
            Event(user="a", shop="s", ts=100.0, amount=1.0, qty=1.0),
            Event(user="a", shop="s", ts=50.0, amount=3.0, qty=1.0),  # late: taken at t=100
            Event(user="a", shop="s", ts=1e12, amount=5.0, qty=1.0),  # a bogus future time
            Event(user="a", shop="s", ts=120.0, amount=7.0, qty=1.0),  # back to normal
        ]
    )
    assert x[1, 0] == 1.0 and x[1, 12] == 0.0  # one earlier event; no time since it
    assert x[2, 0] == 0.0  # everything expired
    # Far more than a horizon late: the key starts afresh instead of staying stuck at 1e12.
    assert x[3, 0] == 0.0 and x[3, 12] == pytest.approx(math.log1p(CAP))
    y = state.update([Event(user="a", shop="s", ts=130.0, amount=9.0, qty=1.0)])
    assert y[0, 0] == 1.0 and y[0, 1] == 7.0


def test_iso_and_millisecond_times() -> None:
    column = SincePrevious(cap_seconds=1e6)
    for fmt, first, second in [
        ("iso8601", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 1, tzinfo=UTC)),
        ("epoch_ms", 1_000, 61_000),
    ]:
        spec = FeatureSpec("p", "e", "t", [column], time_format=fmt)  # type: ignore[arg-type]
        E = spec.event_type()
        x = AggregateState(spec).update([E(e="k", t=first), E(e="k", t=second)])
        np.testing.assert_allclose(x[:, 0], [math.log1p(1e6), math.log1p(60.0)])


def test_build_features_needs_the_state_of_its_spec() -> None:
    events = [Event(user="a", shop="s", ts=0.0, amount=1.0, qty=1.0)]
    with pytest.raises(ValueError, match="AggregateState"):
        build_features(SPEC, events)
    other = FeatureSpec("p", "user", "ts", [SincePrevious()], time_format="epoch_s")
    with pytest.raises(ValueError, match="different feature spec"):
        build_features(SPEC, events, AggregateState(other))
    assert build_features(SPEC, [], AggregateState(SPEC)).shape == (0, 18)
