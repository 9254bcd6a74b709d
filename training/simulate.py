"""Labeled synthetic events: e-commerce orders and sensor readings with injected anomalies.

Labels never travel inside an event: the generator yields (event, label) pairs and the CLI
writes labels to a separate CSV (`event_id,is_anomaly,kind`).

>>> gen = simulate("orders", seed=1, anomaly_rate=0.0)
>>> event, label = next(gen)
>>> sorted(event)[:4], label.is_anomaly
(['amount', 'country', 'created_at', 'customer_id'], False)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from streamer.profiles import COUNTRIES

ORDER_ANOMALIES = ("amount_spike", "bulk_items", "discount_abuse", "shipping_mismatch")
# drift, stuck and oscillation span many readings; oscillation is collective: each reading
# is a normal operating point of some sensor, only the sequence is wrong.
SENSOR_ANOMALIES = ("spike", "combination", "drift", "stuck", "oscillation")
EPOCH_2026 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Label:
    event_id: str
    is_anomaly: bool
    kind: str  # "normal" or the anomaly kind


def simulate(
    profile: str,
    seed: int = 0,
    anomaly_rate: float = 0.01,
    start_seconds: float | None = None,
    mean_gap_seconds: float = 2.0,
    live_clock: bool = False,
    kinds: tuple[str, ...] | None = None,
) -> Iterator[tuple[dict[str, Any], Label]]:
    """Endless (event, label) stream. `live_clock` stamps events with the wall clock;
    `kinds` limits the anomalies injected to these kinds (default: all of the profile's)."""
    rng = np.random.default_rng(seed)
    start = EPOCH_2026 if start_seconds is None else start_seconds
    known = ORDER_ANOMALIES if profile == "orders" else SENSOR_ANOMALIES
    unknown = set(kinds or ()) - set(known)
    if unknown:
        raise ValueError(
            f"unknown {profile} anomaly kind(s) {sorted(unknown)}: choose from {known}"
        )
    if profile == "orders":
        return _orders(rng, anomaly_rate, start, mean_gap_seconds, live_clock, kinds or known)
    if profile == "sensors":
        return _sensors(rng, anomaly_rate, start, live_clock, kinds or known)
    raise ValueError(f"unknown profile {profile!r}: choose orders or sensors")


# -- orders ---------------------------------------------------------------------------------

_SEGMENTS = {  # unit price median, items mean above 1, payment weights
    "budget": (15.0, 1.2, (0.55, 0.25, 0.05, 0.15)),
    "regular": (40.0, 1.5, (0.60, 0.25, 0.10, 0.05)),
    "premium": (120.0, 1.0, (0.70, 0.15, 0.14, 0.01)),
}
_SHIP_BASE = {
    "US": 5.0,
    "CA": 9.0,
    "GB": 6.0,
    "DE": 5.0,
    "FR": 5.5,
    "NL": 5.0,
    "ES": 6.0,
    "IT": 6.0,
}
_PAYMENTS = ("card", "paypal", "bank_transfer", "gift_card")


def _orders(
    rng: np.random.Generator,
    rate: float,
    start: float,
    gap: float,
    live: bool,
    kinds: tuple[str, ...],
) -> Iterator[tuple[dict[str, Any], Label]]:
    n_customers = 2000
    segments = rng.choice(list(_SEGMENTS), size=n_customers, p=[0.4, 0.45, 0.15])
    homes = rng.choice(
        COUNTRIES, size=n_customers, p=[0.4, 0.12, 0.12, 0.1, 0.06, 0.08, 0.07, 0.05]
    )
    t = start
    n = 0
    while True:
        n += 1
        t = _now() if live else t + rng.exponential(gap)
        c = int(rng.integers(n_customers))
        unit_median, items_mean, pay_w = _SEGMENTS[str(segments[c])]
        items = 1 + int(rng.poisson(items_mean))
        unit = float(rng.lognormal(math.log(unit_median), 0.35))
        discount = 0.0 if rng.random() < 0.7 else float(rng.choice([0.05, 0.1, 0.15, 0.2]))
        payment = str(rng.choice(_PAYMENTS, p=pay_w))
        method = str(rng.choice(["standard", "express", "pickup"], p=[0.7, 0.2, 0.1]))
        country = str(homes[c])
        kind = "normal"
        if rng.random() < rate:
            kind = str(rng.choice(kinds))
            if kind == "amount_spike":
                unit *= float(rng.uniform(50, 150))
            elif kind == "bulk_items":
                items = int(rng.integers(25, 80))
            elif kind == "discount_abuse":
                discount = float(rng.uniform(0.6, 0.95))
        amount = round(items * unit * (1.0 - discount), 2)
        shipping = _shipping(method, country, items, amount)
        if kind == "shipping_mismatch":
            shipping = round(float(rng.uniform(80, 250)), 2)
        event = {
            "order_id": f"o-{n:09d}",
            "customer_id": f"c-{c:05d}",
            "created_at": _iso(t),
            "amount": amount,
            "items": items,
            "discount": round(discount, 3),
            "shipping_cost": shipping,
            "shipping_method": method,
            "payment_method": payment,
            "country": country,
        }
        yield event, Label(str(event["order_id"]), kind != "normal", kind)


def _shipping(method: str, country: str, items: int, amount: float) -> float:
    if method == "pickup":
        return 0.0
    cost = _SHIP_BASE[country] + 0.5 * items
    if method == "express":
        return round(cost * 2.5, 2)
    return 0.0 if amount >= 100.0 else round(cost, 2)


# -- sensors --------------------------------------------------------------------------------


def _sensors(
    rng: np.random.Generator, rate: float, start: float, live: bool, kinds: tuple[str, ...]
) -> Iterator[tuple[dict[str, Any], Label]]:
    n_sensors = 20
    base_rpm = rng.uniform(1200, 3000, size=n_sensors)
    phase = rng.uniform(0, 2 * math.pi, size=n_sensors)
    # Ongoing multi-reading anomalies per sensor: (kind, readings left, state).
    ongoing: dict[int, tuple[str, int, dict[str, float]]] = {}
    t = start
    n = 0
    while True:
        n += 1
        s = (n - 1) % n_sensors
        if s == 0:
            t = _now() if live else t + 1.0
        rpm = base_rpm[s] * (1 + 0.03 * math.sin(t / 600 + phase[s])) + rng.normal(0, 15)
        reading = _operating_point(rng, rpm)
        kind = "normal"
        if s in ongoing:
            kind, left, state = ongoing[s]
            if kind == "drift":
                state["offset"] += 0.25
                reading["temperature"] += state["offset"]
            elif kind == "oscillation":
                state["up"] = 1.0 - state["up"]
                reading = _operating_point(rng, rpm + state["up"] * state["swing"])
            else:  # stuck: the same values as when it stuck
                reading = {k: state[k] for k in reading}
            if left > 1:
                ongoing[s] = (kind, left - 1, state)
            else:
                del ongoing[s]
        elif rng.random() < rate:
            kind = str(rng.choice(kinds))
            if kind == "spike":
                field = str(rng.choice(["temperature", "pressure", "vibration", "current"]))
                sigma = {"temperature": 0.8, "pressure": 0.05, "vibration": 0.05, "current": 0.3}
                reading[field] += float(rng.choice([-1, 1]) * rng.uniform(8, 15) * sigma[field])
            elif kind == "combination":
                # Hot and drawing current as if at full speed, while the shaft turns slowly.
                reading["temperature"] += 0.012 * 1500
                reading["current"] += 0.004 * 1500
            elif kind == "drift":
                ongoing[s] = ("drift", 40, {"offset": 4.0})
                reading["temperature"] += 4.0
            elif kind == "stuck":
                ongoing[s] = ("stuck", 30, dict(reading))
            else:
                # Hunting speed control: every other reading the shaft runs 400 rpm off,
                # towards the middle of the fleet's range, so each point stays a normal one.
                swing = 400.0 if base_rpm[s] < 2100 else -400.0
                ongoing[s] = ("oscillation", 19, {"up": 1.0, "swing": swing})
                reading = _operating_point(rng, rpm + swing)
        event = {
            "reading_id": f"r-{n:09d}",
            "sensor_id": f"s-{s:02d}",
            "ts": int(t * 1000),
            **{k: round(float(v), 4) for k, v in reading.items()},
        }
        yield event, Label(str(event["reading_id"]), kind != "normal", kind)


def _operating_point(rng: np.random.Generator, rpm: float) -> dict[str, float]:
    """A healthy reading at this shaft speed: the other quantities follow rpm, plus noise."""
    return {
        "rpm": rpm,
        "temperature": 30 + 0.012 * rpm + rng.normal(0, 0.8),
        "pressure": 2 + 0.0015 * rpm + rng.normal(0, 0.05),
        "vibration": 0.5 + 0.0004 * rpm + rng.normal(0, 0.05),
        "current": 5 + 0.004 * rpm + rng.normal(0, 0.3),
    }


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _now() -> float:
    return datetime.now(UTC).timestamp()
