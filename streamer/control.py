"""Runtime control and subscriber feedback, applied between batches. Pure: no Kafka here.

Control messages (JSON on `control.topic`, read by every replica from the beginning, so a
restarted or new replica ends in the same state):

    {"action": "set_threshold", "quantile": 0.995, "window_size": 20000}   either or both
    {"action": "set_entity_threshold", "entity": "s-03", "value": 1.5}    a fixed threshold
    {"action": "clear_entity_threshold", "entity": "s-03"}
    {"action": "mute", "entity": "c-00097"}        scored, never alerted, until unmuted
    {"action": "unmute", "entity": "c-00097"}

Feedback (JSON on `control.feedback_topic`, keyed by the alert or incident id):

    {"type": "false_positive", "entity": "c-00097", "alert_id": "5d0c..."}
    {"type": "ack", "incident_id": "9b1f..."}
    {"type": "label", "key_field": "terminal_id", "key": "T123", "event_id": "tx-981",
     "event_time": 1530403200, "anomaly": true}

A `label` confirms that an event was anomalous (fraud, say), whenever that becomes known: the
event `event_id` (its value of the spec's `id_field`, as alerts carry it) of `key` (its
`key_field` value; both with the JSON type the events carry) at `event_time` (the spec's
time format: epoch seconds or milliseconds, or an ISO 8601 string with a zone). It feeds the
`label_rate` feature columns keyed by `key_field` (streamer/features.py): later events of
that key see it once their window reaches back to its event time. A label whose
`key_field` no label_rate column uses, or that is older than the columns' reach, is
"unmatched". A label counts once per event: a repeat (same `key_field`, `key` and
`event_id`; Kafka redelivers, investigators confirm twice) is a "duplicate" and changes
nothing. `anomaly: false` withdraws the event's label (investigators correct mistakes): if
it is counted, its hour counts one less ("withdrawn"), and a later `anomaly: true` counts it
again; for an event not counted (never labeled, withdrawn already, or older than the reach)
it changes nothing ("unmatched"). Messages apply in topic order, so the counts are those of
the labels standing at that point (a withdrawal goes by the id: it may leave out
`event_time`, which a label with `anomaly: true` needs). Labels are kept apart from the
per-partition state (streamer/labels.py), so they outlive partition moves and model reloads;
every replica reads them all, and a restarted one re-reads the topic from its start into an
empty store, so each label again counts once.
The denominator is the events this replica scored, so the rate is exact when one replica
sees all of a key's events (a single replica, or input keyed by the label_rate key).

A false positive raises that entity's threshold: whatever threshold judges the entity
(global, its own, or a fixed override) is multiplied by `false_positive_factor` per false
positive, up to `max_factor` in all. Nothing else changes, and an `ack` changes nothing (it
is counted). Without an `entity`, the id is looked up among this replica's recent alerts
and incidents; copy the alert's `entity` into the feedback to be sure every replica applies
it.

>>> from streamer.config import ControlSettings
>>> c = ControlState(ControlSettings(false_positive_factor=2.0, max_factor=3.0))
>>> c.apply_feedback(b'{"type": "false_positive", "entity": "e1"}', key=None)
('false_positive', 'applied')
>>> c.apply_feedback(b'{"type": "false_positive", "entity": "e1"}', key=None)
('false_positive', 'applied')
>>> c.factors["e1"]
3.0
>>> flagged, used = c.adjust(["e1", "e2"], np.array([2.5, 2.5]), np.array([True, True]),
...                          np.array([1.0, 1.0]))
>>> flagged.tolist(), used.tolist()
([False, True], [3.0, 1.0])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from datetime import datetime
from typing import Annotated

import msgspec
import numpy as np

from streamer.config import DEFAULT_MAX_ENTITIES, ControlSettings
from streamer.features import TimeFormat
from streamer.labels import LabelStore

RECENT_IDS = 100_000  # alert and incident ids remembered for feedback without an entity


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="action"):
    pass


class SetThreshold(_Message, tag="set_threshold", frozen=True):
    quantile: float | None = None
    window_size: int | None = None

    def __post_init__(self) -> None:
        if self.quantile is None and self.window_size is None:
            raise ValueError("set_threshold needs quantile and/or window_size")
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")
        if self.window_size is not None and self.window_size < 1:
            raise ValueError("window_size must be >= 1")


class SetEntityThreshold(_Message, tag="set_entity_threshold", frozen=True):
    entity: str | int
    value: float

    def __post_init__(self) -> None:
        if not self.value > 0:
            raise ValueError("value must be > 0")


class ClearEntityThreshold(_Message, tag="clear_entity_threshold", frozen=True):
    entity: str | int


class Mute(_Message, tag="mute", frozen=True):
    entity: str | int


class Unmute(_Message, tag="unmute", frozen=True):
    entity: str | int


Control = SetThreshold | SetEntityThreshold | ClearEntityThreshold | Mute | Unmute


class _Feedback(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class _AboutAlert(_Feedback, frozen=True):
    entity: str | int | None = None
    alert_id: str | None = None
    incident_id: str | None = None
    note: str | None = None


class FalsePositive(_AboutAlert, tag="false_positive", frozen=True):
    pass


class Ack(_AboutAlert, tag="ack", frozen=True):
    pass


class Label(_Feedback, tag="label", frozen=True, forbid_unknown_fields=True):
    """One event's confirmed label, for the label_rate features."""

    key_field: str
    key: str | int
    event_id: str | int  # the event's `id_field` value: a label counts once per event
    anomaly: bool
    # Required to count a label (its hour); a withdrawal goes by the id and may omit it.
    event_time: Annotated[datetime, msgspec.Meta(tz=True)] | int | float | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.anomaly and self.event_time is None:
            raise ValueError("a label with anomaly true needs event_time")


Feedback = FalsePositive | Ack | Label


class ControlError(ValueError):
    """A control or feedback message that cannot be applied; the text says why."""


class ControlState:
    """`max_label_keys`: the label store's keys (the app passes `state.max_entities`, as the
    evaluator's aggregates bound theirs), least recently labeled evicted first."""

    def __init__(
        self,
        settings: ControlSettings,
        time_format: TimeFormat = "epoch_s",
        max_label_keys: int = DEFAULT_MAX_ENTITIES,
    ) -> None:
        self.settings = settings
        self.time_format = time_format  # how a label's numeric event_time reads
        # Confirmed labels for the label_rate features: the pipelines' states share it.
        self.labels = LabelStore(max_keys=max_label_keys)
        self.overrides: dict[Hashable, float] = {}  # entity -> fixed threshold
        self.muted: set[Hashable] = set()
        self.factors: dict[Hashable, float] = {}  # entity -> false-positive multiplier
        # The threshold settings the control topic asked for (merged), and how many times
        # they changed: the app re-applies them when the count moves or a pipeline is new.
        self.threshold: SetThreshold | None = None
        self.threshold_changes = 0
        self._recent: OrderedDict[str, Hashable] = OrderedDict()  # alert/incident id -> entity
        self._control = msgspec.json.Decoder(Control)
        self._feedback = msgspec.json.Decoder(Feedback)

    @property
    def active(self) -> bool:
        """Whether any entity is treated specially (adjust() is a no-op otherwise)."""
        return bool(self.overrides or self.muted or self.factors)

    def apply_control(self, value: bytes | None) -> str:
        """Apply one control message; returns its action. Raises ControlError."""
        try:
            message = self._control.decode(value or b"")
        except (msgspec.DecodeError, ValueError) as exc:
            raise ControlError(f"control message refused: {exc}") from exc
        if isinstance(message, SetThreshold):
            old = self.threshold or SetThreshold(quantile=message.quantile)
            self.threshold = SetThreshold(
                quantile=message.quantile if message.quantile is not None else old.quantile,
                window_size=(
                    message.window_size if message.window_size is not None else old.window_size
                ),
            )
            self.threshold_changes += 1
        elif isinstance(message, SetEntityThreshold):
            self.overrides[message.entity] = message.value
        elif isinstance(message, ClearEntityThreshold):
            self.overrides.pop(message.entity, None)
        elif isinstance(message, Mute):
            self.muted.add(message.entity)
        else:
            self.muted.discard(message.entity)
        return type(message).__struct_config__.tag  # type: ignore[return-value]

    def apply_feedback(self, value: bytes | None, key: bytes | None) -> tuple[str, str]:
        """Apply one feedback message; returns (type, "applied" | "unmatched" | "duplicate" |
        "withdrawn": a label counted already, or one taken back)."""
        try:
            message = self._feedback.decode(value or b"")
        except (msgspec.DecodeError, ValueError) as exc:
            raise ControlError(f"feedback message refused: {exc}") from exc
        if isinstance(message, Label):
            return "label", self._label(message)
        kind = "false_positive" if isinstance(message, FalsePositive) else "ack"
        entity: Hashable | None = message.entity
        if entity is None:
            ids = [message.alert_id, message.incident_id, key.decode() if key else None]
            entity = next((self._recent[i] for i in ids if i and i in self._recent), None)
        if entity is None:
            return kind, "unmatched"
        if kind == "false_positive":
            s = self.settings
            factor = self.factors.get(entity, 1.0) * s.false_positive_factor
            self.factors[entity] = min(s.max_factor, factor)
        return kind, "applied"

    def _label(self, message: Label) -> str:
        if message.key_field not in self.labels.key_fields:
            return "unmatched"
        if not message.anomaly:  # a correction: the event was not anomalous after all
            taken = self.labels.withdraw(message.key_field, message.key, message.event_id)
            return "withdrawn" if taken == "withdrawn" else "unmatched"
        t = message.event_time
        assert t is not None  # Label.__post_init__
        if isinstance(t, datetime):
            seconds = t.timestamp()
        else:
            seconds = t / 1000.0 if self.time_format == "epoch_ms" else float(t)
        outcome = self.labels.add(message.key_field, message.key, seconds, message.event_id)
        if outcome == "counted":
            return "applied"
        return "duplicate" if outcome == "duplicate" else "unmatched"

    def remember(self, ids: Sequence[str], entities: Sequence[Hashable]) -> None:
        """Alert and incident ids just published, so feedback without an entity finds it."""
        for i, entity in zip(ids, entities, strict=True):
            self._recent[i] = entity
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    def adjust(
        self,
        keys: Sequence[Hashable],
        scores: np.ndarray,
        flagged: np.ndarray,
        used: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-judge the events of entities with an override, a factor or a mute."""
        if not self.active:
            return flagged, used
        flagged, used = flagged.copy(), used.copy()
        for i, key in enumerate(keys):
            if key in self.muted:
                flagged[i] = False
                continue
            base = self.overrides.get(key)
            factor = self.factors.get(key)
            if base is None and factor is None:
                continue
            value = (used[i] if base is None else base) * (factor or 1.0)
            used[i] = value
            # A factor alone only raises the threshold the event was judged against: it can
            # drop an alert, never add one (a smoothed threshold's cooldown or run length
            # still holds). A fixed override judges the score anew.
            flagged[i] = scores[i] > value and (base is not None or flagged[i])
        return flagged, used
