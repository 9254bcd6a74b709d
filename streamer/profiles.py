"""Built-in feature specs for the two event profiles the simulator produces.

A config may name one of these (`profile = "orders"`) or spell out its own `[features]` table.
"""

from __future__ import annotations

from streamer.features import FeatureSpec, HourOfDay, Log1p, Numeric, OneHot, Ratio

PAYMENT_METHODS = ["card", "paypal", "bank_transfer", "gift_card"]
COUNTRIES = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "CA"]
SHIPPING = ["standard", "express", "pickup"]

ORDERS = FeatureSpec(
    profile="orders",
    entity_field="customer_id",
    time_field="created_at",
    time_format="iso8601",
    id_field="order_id",
    columns=[
        Log1p(field="amount"),
        Numeric(field="items"),
        Numeric(field="discount"),
        Log1p(field="shipping_cost"),
        Ratio(numerator="amount", denominator="items"),
        OneHot(field="payment_method", vocabulary=PAYMENT_METHODS),
        OneHot(field="country", vocabulary=COUNTRIES),
        OneHot(field="shipping_method", vocabulary=SHIPPING),
        HourOfDay(),
    ],
)

SENSORS = FeatureSpec(
    profile="sensors",
    entity_field="sensor_id",
    time_field="ts",
    time_format="epoch_ms",
    id_field="reading_id",
    columns=[
        Numeric(field="rpm"),
        Numeric(field="temperature"),
        Numeric(field="pressure"),
        Numeric(field="vibration"),
        Numeric(field="current"),
    ],
)

BUILTIN: dict[str, FeatureSpec] = {"orders": ORDERS, "sensors": SENSORS}
