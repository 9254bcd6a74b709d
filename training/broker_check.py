"""The evaluator's broker check: replay a series' test part through a real broker and the real
daemon (`python -m streamer run`), and compare its alerts with the in-process replay's.

    python -m training.evaluate --config eval/skab.toml --broker 127.0.0.1:9092

Per series, for the first (primary) detector: fresh topics (one input partition, so offset k
is test row k), the test rows produced as the same JSON bytes and event timestamps the
in-process replay feeds `Pipeline.process`, a daemon subprocess on a config equal to the
evaluator's (`_settings`: same bundle, features, threshold, smoothing) with its own consumer
group reading from the earliest offset, SIGTERM once it has consumed everything, and the
alert topic read back and mapped to rows by `source.offset`.

Batch cuts: the in-process replay cuts the test part every `replay.batch_size` rows, and a
learning threshold moves once per batch, so alerts depend on the cuts. The daemon gets
`batch.max_batch_size = replay.batch_size` and a `max_wait_seconds` that is long next to
filling a batch from a pre-filled topic, so it cuts at the same rows (the last, partial
batch goes out when the wait ends); the check verifies that from the daemon's metrics (every
batch before the last one full) rather than assuming it: `cuts_checked_series`.

Per-entity history (aggregate features, windows of an LSTM or dense_window model, per-entity
thresholds): the in-process replay first rebuilds it from the training rows. Here those rows
go to the input topic before the test part, the group's offset is committed at the first test
row, and the daemon rebuilds the same state as it would after any restart: its restore re-reads
the tail before that offset (`state.restore_events` = the training rows, all of them) in
replay mode, in batches of the same size. The check confirms from the daemon's metrics that
it restored every one of them (`restored_rows`).

Delivered labels (label_rate columns): the in-process replay delivers the labels that fall
due inside a batch before it (`training.evaluate.label_spans`), where they change no feature.
Here they go to a feedback topic as `{"type": "label", ...}` messages, in lockstep with the
test rows: the labels due before the first test row before the daemon starts, then, chunk by
chunk of whole batches, a chunk's labels, and its rows once the daemon's metrics show it has
applied them, and the next chunk once it has scored those. A chunk spans at most as long as
labels may come early without changing a feature, so the daemon's features are the
in-process ones, batch for batch.

Refused (exit 2, naming why): replays with retraining (the daemon run serves one bundle
throughout); delivered labels where the in-process replay cuts batches where labels fall due
(a label delay longer than a column's, or a test batch spanning more than the delay), or
with per-entity thresholds (the daemon's restore scores the earlier rows before it has read
their labels).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer import config as config_mod
from streamer.config import BatchSettings, MetricsSettings, Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # where `python -m streamer` imports from
# The daemon's batch wait: long next to filling a batch from a pre-filled topic, so batches
# are cut by size (checked, not assumed); the partial last batch waits this long.
MAX_WAIT_SECONDS = 5.0
MISMATCH_OFFSETS = 10  # offsets listed per series and side in the result
FEEDBACK_POLL_SECONDS = 0.1  # the daemon's control.poll_seconds when labels are fed


class BrokerCheckError(Exception):
    """The broker run could not be completed (broker, daemon or topic trouble)."""


def refusal(config: Any) -> str | None:
    """Why the broker check cannot compare like with like for this eval config (None: it
    can). Read from the config, so it is refused before any training."""
    from training.datasets import label_delay
    from training.evaluate import early_label_seconds

    spec = config.features
    if spec.labeled:
        if early_label_seconds(spec, label_delay(spec, config.replay.label_delay_seconds)) is None:
            return (
                "replay.label_delay_seconds is longer than a label_rate column's delay: the "
                "in-process replay cuts batches where labels fall due, the daemon by size"
            )
        if config.detectors and config.detectors[0].threshold.per_entity:
            return (
                "delivered labels with per-entity thresholds: the daemon's restore scores "
                "the earlier rows before it has read their labels"
            )
    if config.replay.retrain_every_rows is not None:
        return (
            "replay.retrain_every_rows swaps in retrained bundles mid-replay; the daemon run "
            "serves the first bundle throughout"
        )
    return None


def to_toml(doc: dict[str, Any]) -> str:
    """A settings document as TOML: scalars first, then one `[table]` per top-level dict;
    deeper values inline; None left out (the default).

    >>> print(to_toml({"a": 1, "t": {"s": "x", "l": [1.5, {"k": True}], "n": None,
    ...                               "w": {"a.*": 0.0}}}), end="")
    a = 1
    <BLANKLINE>
    [t]
    s = "x"
    l = [1.5, { k = true }]
    w = { "a.*" = 0.0 }
    """

    def key(k: str) -> str:  # a bare key, or quoted (a score_weights pattern, say)
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return ("-inf" if v < 0 else "inf") if math.isinf(v) else "nan" if v != v else repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            items = ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None)
            return "{ " + items + " }"
        raise TypeError(f"no TOML for {v!r}")

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict | None)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def daemon_settings(
    settings: Settings,
    bootstrap: str,
    topics: Topics,
    batch_size: int,
    port: int,
    history: int = 0,
    timeout_seconds: float = 60.0,
) -> Settings:
    """The evaluator's settings for one pipeline, pointed at real topics; with `history`
    rows before the test part, a restore that re-reads all of them."""
    kafka = msgspec.structs.replace(
        settings.kafka,
        bootstrap_servers=bootstrap,
        input_topic=topics.input,
        alert_topic=topics.alerts,
        dead_letter_topic=topics.dead_letters,
        group_id=topics.group,
        client_id=topics.group,
        auto_offset_reset="earliest",
        create_output_topics=False,  # made here, one partition each and no time retention
    )
    state = settings.state
    if history:
        state = msgspec.structs.replace(
            state, restore_events=history, restore_timeout_seconds=timeout_seconds
        )
    control = settings.control
    if topics.feedback:  # polled often: the check waits for each chunk's labels to apply
        control = msgspec.structs.replace(
            control, feedback_topic=topics.feedback, poll_seconds=FEEDBACK_POLL_SECONDS
        )
    return msgspec.structs.replace(
        settings,
        kafka=kafka,
        state=state,
        control=control,
        batch=BatchSettings(max_batch_size=batch_size, max_wait_seconds=MAX_WAIT_SECONDS),
        metrics=MetricsSettings(host="127.0.0.1", port=port),
        log_level="INFO",
    )


def write_settings(settings: Settings, path: Path) -> None:
    """Write `settings` as the daemon's TOML and check it loads back equal."""
    path.write_text(to_toml(msgspec.to_builtins(settings)))
    loaded = config_mod.load(path, environ={})
    if loaded != settings:
        raise BrokerCheckError(f"{path}: the daemon config does not load back as written")


@dataclass
class Topics:
    input: str
    alerts: str
    dead_letters: str
    group: str
    feedback: str | None = None  # label feedback, for label_rate features

    @classmethod
    def fresh(cls, name: str, feedback: bool = False) -> Topics:
        token = f"{_slug(name)}-{uuid.uuid4().hex[:8]}"
        return cls(
            f"eval-in-{token}", f"eval-alerts-{token}", f"eval-dlq-{token}", f"eval-{token}",
            f"eval-feedback-{token}" if feedback else None,
        )  # fmt: skip

    def all(self) -> list[str]:
        return [self.input, self.alerts, self.dead_letters, *filter(None, [self.feedback])]


@dataclass
class Feedback:
    """The label messages of one series for the feedback topic: those due before its first
    test row, then for each chunk of test rows [a, b) (counted from the first test row) those
    that fall due inside it, delivered before its rows."""

    before: list[bytes]
    chunks: list[tuple[int, int, list[bytes]]]

    @property
    def messages(self) -> int:
        return len(self.before) + sum(len(labels) for _, _, labels in self.chunks)


def feedback_plan(
    series: Any, spec: Any, fields: list[str], delay: float, batch_size: int
) -> Feedback:
    """What the in-process replay delivers (`training.evaluate.replay`), as feedback
    messages, in chunks of whole batches that span at most as long as labels may come early
    without changing a feature (`training.evaluate.early_label_seconds`)."""
    from streamer.features import LabelRate
    from streamer.labels import deliveries
    from training.evaluate import _spans, batch_span, due_events, early_label_seconds, label_spans

    n0, n, seconds = series.n_train, series.n, series.seconds
    due = dict(deliveries(seconds, series.labels, delay))
    early = early_label_seconds(spec, delay)
    if early is None or label_spans(n0, n, batch_size, due, seconds, early) != _spans(
        n0, n, batch_size, ()
    ):
        raise BrokerCheckError(
            f"{series.name}: a test batch spans more than labels may come early ({early} s), "
            "so the in-process replay cuts it where labels fall due; the daemon cuts by size"
        )
    clock = np.maximum.accumulate(seconds)
    points = sorted(due)
    keys = sorted({spec.key_of(c) for c in spec.columns if isinstance(c, LabelRate)})
    encode = msgspec.json.Encoder().encode

    def labels(lo: int, hi: int) -> list[bytes]:
        return [
            encode({"type": "label", "key_field": k, "key": row[k],
                    "event_id": row[spec.id_field], "event_time": row[spec.time_field],
                    "anomaly": True})
            for row in due_events(series, fields, due, points, lo, hi)
            for k in keys
        ]  # fmt: skip

    chunks, a = [], n0
    while a < n:
        b = min(a + batch_size, n)
        while b < n and batch_span(seconds, clock, a, min(b + batch_size, n)) <= early:
            b = min(b + batch_size, n)
        chunks.append((a - n0, b - n0, labels(a, b)))
        a = b
    return Feedback(labels(0, n0), chunks)


def _slug(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")
    return out[-60:] or "series"


@dataclass
class SeriesCheck:
    """One series through the broker: the rows alerted on each side."""

    series: str
    rows: int
    in_process: list[int]
    broker: list[int]
    batches: int
    cuts_checked: bool
    dead_letters: int
    restored: int = 0  # earlier rows the daemon's restore replayed (history)
    labels: int = 0  # label messages fed to the daemon's feedback topic
    max_score_difference: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.in_process == self.broker


def run_series(
    bootstrap: str,
    settings: Settings,
    name: str,
    messages: list[tuple[bytes, int]],
    batch_size: int,
    in_process_flags: np.ndarray,
    in_process_scores: dict[int, float],
    work_dir: Path,
    timeout_seconds: float,
    history: list[tuple[bytes, int]] | None = None,
    feedback: Feedback | None = None,
) -> SeriesCheck:
    """Produce `messages` (value, timestamp ms) to fresh topics, run the daemon over them,
    and compare its alerts with `in_process_flags` (one per message).

    `history`: rows produced before `messages` and not scored: the group starts at the first
    message, and the daemon's state restore replays all of them, as the in-process replay
    does the training rows. `feedback`: label messages, fed in lockstep with `messages`."""
    from kafka.admin import NewTopic

    started = time.monotonic()
    topics = Topics.fresh(name, feedback=feedback is not None)
    admin = _admin(bootstrap)
    try:
        forever = {"retention.ms": "-1"}  # event times may be years old: keep them anyway
        admin.create_topics(
            [NewTopic(t, 1, 1, topic_configs=forever) for t in topics.all()],
            wait_for_metadata=True,
        )
        history = history or []
        try:
            lockstep = None
            if feedback is None:
                _produce(bootstrap, topics.input, history + messages)
            else:
                assert topics.feedback is not None
                _produce(bootstrap, topics.input, history)
                _produce(bootstrap, topics.feedback, [(m, -1) for m in feedback.before])
                lockstep = _Lockstep(bootstrap, topics, feedback, messages, len(history),
                                     batch_size)  # fmt: skip
            if history:
                _commit(bootstrap, topics.group, topics.input, len(history))
            port = _free_port()
            cfg = daemon_settings(
                settings, bootstrap, topics, batch_size, port, len(history), timeout_seconds
            )
            work_dir.mkdir(parents=True, exist_ok=True)
            path = work_dir / f"{topics.group}.toml"
            write_settings(cfg, path)
            batches, cuts_checked, restored = _run_daemon(
                path, port, work_dir / f"{topics.group}.log", topics, len(messages),
                batch_size, timeout_seconds, lockstep,
            )  # fmt: skip
            if restored != len(history):
                raise BrokerCheckError(
                    f"{name}: the daemon restored its state from {restored} of "
                    f"{len(history)} earlier rows"
                )
            done = _committed(bootstrap, topics.group, topics.input) - len(history)
            if done != len(messages):
                raise BrokerCheckError(
                    f"{name}: the daemon committed offset {done} of {len(messages)} "
                    "(counted from the first test row)"
                )
            alerts = _read_alerts(bootstrap, topics.alerts, timeout_seconds)
            dead = len(_read(bootstrap, topics.dead_letters, timeout_seconds))
        finally:
            admin.delete_topics(topics.all())
    finally:
        admin.close()
    first = len(history)  # offset of the first test row
    broker = sorted({a.source.offset - first for a in alerts if a.source.topic == topics.input})
    diffs = [
        abs(a.score - in_process_scores[a.source.offset - first])
        for a in alerts
        if a.source.offset - first in in_process_scores
    ]
    check = SeriesCheck(
        series=name,
        rows=len(messages),
        restored=restored,
        labels=feedback.messages if feedback else 0,
        in_process=np.flatnonzero(in_process_flags).tolist(),
        broker=broker,
        batches=batches,
        cuts_checked=cuts_checked,
        dead_letters=dead,
        max_score_difference=max(diffs) if diffs else None,
        seconds=time.monotonic() - started,
    )
    if len(alerts) != len(broker):
        check.notes.append(f"{len(alerts) - len(broker)} duplicate alert(s) on the topic")
    return check


def summary(detector: str, checks: list[SeriesCheck], seconds: float) -> dict[str, Any]:
    """The result.json entry: totals, and the series whose alerts differ."""
    mismatches = []
    for c in checks:
        if not c.identical:
            only_in, only_b = (
                sorted(set(c.in_process) - set(c.broker)),
                sorted(set(c.broker) - set(c.in_process)),
            )
            mismatches.append(
                {
                    "series": c.series,
                    "only_in_process": only_in[:MISMATCH_OFFSETS],
                    "only_broker": only_b[:MISMATCH_OFFSETS],
                    "only_in_process_count": len(only_in),
                    "only_broker_count": len(only_b),
                    "cuts_checked": c.cuts_checked,
                }
            )
    diffs = [c.max_score_difference for c in checks if c.max_score_difference is not None]
    return {
        "detector": detector,
        "series": len(checks),
        "rows": sum(c.rows for c in checks),
        "restored_rows": sum(c.restored for c in checks),
        "labels_fed": sum(c.labels for c in checks),
        "alerts_in_process": sum(len(c.in_process) for c in checks),
        "alerts_broker": sum(len(c.broker) for c in checks),
        "identical_series": sum(c.identical for c in checks),
        "identical": all(c.identical for c in checks),
        "cuts_checked_series": sum(c.cuts_checked for c in checks),
        "batches": sum(c.batches for c in checks),
        "dead_letters": sum(c.dead_letters for c in checks),
        "max_score_difference": max(diffs) if diffs else None,
        "mismatches": mismatches,
        "notes": [f"{c.series}: {n}" for c in checks for n in c.notes],
        "seconds": round(seconds, 2),
    }


def headline(check: dict[str, Any]) -> str:
    verdict = "identical" if check["identical"] else "DIFFERENT"
    restored, labels = check.get("restored_rows", 0), check.get("labels_fed", 0)
    return (
        f"  broker check ({check['detector']}): {verdict}: {check['identical_series']}/"
        f"{check['series']} series, {check['rows']} rows"
        + (f" (state restored from {restored} earlier)" if restored else "")
        + (f" ({labels} labels fed)" if labels else "")
        + ", alerts in-process "
        f"{check['alerts_in_process']} / through Kafka {check['alerts_broker']}, "
        f"{check['seconds']:.0f}s"
    )


# -- Kafka and the daemon process --------------------------------------------------------------


def _admin(bootstrap: str) -> Any:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="eval-broker-check")
    except KafkaError as exc:
        raise BrokerCheckError(f"--broker {bootstrap}: {exc}") from exc


def _produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes, int]], first_offset: int = 0
) -> None:
    """Produce (value, timestamp ms; -1: now) to partition 0, which must be at `first_offset`."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=262_144,
        max_in_flight_requests_per_connection=1,  # offsets in row order, retries or not
    )  # fmt: skip
    try:
        futures = [
            producer.send(topic, value=value, timestamp_ms=None if ts < 0 else ts, partition=0)
            for value, ts in messages
        ]
        producer.flush()
        for k, f in enumerate(futures, first_offset):
            offset = f.get(timeout=30).offset
            if offset != k:
                raise BrokerCheckError(f"{topic}: message {k} landed at offset {offset}")
    finally:
        producer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class _Lockstep:
    """Feeds a series' test rows and their labels chunk by chunk (`Feedback`): a chunk's
    labels; its rows once the daemon's metrics show every label so far applied; the next
    chunk once the daemon has scored the chunk's batches."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        feedback: Feedback,
        messages: list[tuple[bytes, int]],
        first_offset: int,
        batch_size: int,
    ) -> None:
        self.bootstrap, self.topics, self.feedback = bootstrap, topics, feedback
        self.messages, self.first_offset, self.batch_size = messages, first_offset, batch_size
        self.labels_sent = len(feedback.before)
        self.k = 0  # the chunk in hand
        self.phase = "labels"  # its labels to send; then "rows" to send; then "scored"
        self.applied = 0.0  # feedback messages the daemon has taken, at the last look

    def progress(self) -> str:
        """Where the feed stands, for an error message."""
        waiting = {"labels": "to send its labels", "rows": "for its labels to apply",
                   "scored": "for its rows to be scored"}[self.phase]  # fmt: skip
        return (
            f"chunk {self.k + 1} of {len(self.feedback.chunks)}, waiting {waiting}; "
            f"feedback messages applied {self.applied:.0f} of {self.labels_sent}"
        )

    def __call__(self, samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bool:
        """One look at the daemon's metrics: produce what is due. True once all is out."""
        assert self.topics.feedback is not None
        # Every feedback message the daemon took, whatever its outcome: a refused label would
        # show as different alerts, not as a wait to the deadline.
        applied = sum(v for (name, _), v in samples.items() if name == "anomaly_feedback_total")
        self.applied = applied
        scored = samples.get(("anomaly_batches_total", ()), 0.0) * self.batch_size
        chunks = self.feedback.chunks
        while self.k < len(chunks):
            a, b, labels = chunks[self.k]
            if self.phase == "labels":
                out = [(m, -1) for m in labels]
                _produce(self.bootstrap, self.topics.feedback, out, self.labels_sent)
                self.labels_sent += len(labels)
                self.phase = "rows"
            if self.phase == "rows":
                if applied < self.labels_sent:
                    return False
                rows = self.messages[a:b]
                _produce(self.bootstrap, self.topics.input, rows, self.first_offset + a)
                self.phase = "scored"
            if self.k < len(chunks) - 1 and scored < b:  # the last ends as any run does
                return False
            self.k, self.phase = self.k + 1, "labels"
        return True


def _run_daemon(
    config: Path,
    port: int,
    log_path: Path,
    topics: Topics,
    rows: int,
    batch_size: int,
    timeout_seconds: float,
    lockstep: _Lockstep | None = None,
) -> tuple[int, bool, int]:
    """Run the daemon until it holds every row (scored, or the last partial batch polled),
    then SIGTERM it (it scores and commits what it holds). Returns (batches, cuts_checked,
    restored): whether its batches before the last were all `batch_size` long, as
    in-process, and how many earlier rows its state restore replayed. `lockstep`: feeds
    the rows (and their labels) while the daemon runs, from its metrics."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    full = rows // batch_size * batch_size
    lag_key = ("anomaly_consumer_lag", (("partition", "0"), ("topic", topics.input)))
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_seconds
            consumed = batches = restored = 0.0
            all_full = False  # seen: the rows before the partial last batch, in full batches
            fed = lockstep is None  # every row produced
            while True:
                if proc.poll() is not None:
                    raise BrokerCheckError(
                        f"the daemon exited {proc.returncode}; see its log {log_path}:\n"
                        + _tail(log_path)
                    )
                if time.monotonic() > deadline:
                    fed_note = "" if lockstep is None else f" ({lockstep.progress()})"
                    raise BrokerCheckError(
                        f"the daemon consumed {consumed:.0f} of {rows} rows in "
                        f"{timeout_seconds:.0f}s{fed_note}; see its log {log_path}:\n"
                        + _tail(log_path)
                    )
                try:
                    samples = _samples(port)
                except (OSError, urllib.error.URLError):
                    time.sleep(0.2)
                    continue
                if not fed:
                    assert lockstep is not None
                    fed = lockstep(samples)
                consumed = samples.get(("anomaly_events_consumed_total", ()), 0.0)
                batches = samples.get(("anomaly_batches_total", ()), 0.0)
                restored = samples.get(("anomaly_state_restored_events_total", ()), 0.0)
                # k batches of at most batch_size rows hold k * batch_size rows: all full.
                all_full = all_full or (consumed == full and batches * batch_size == full)
                # The rest is in the daemon's hands once its position reached the end.
                if fed and (consumed >= rows or (consumed >= full and samples.get(lag_key) == 0.0)):
                    break
                time.sleep(0.2)
            # The partial last batch is cut where the rows end, scored by the deadline or on
            # the way out; only a second batch after the full ones would mean other cuts.
            cuts_checked = all_full and (consumed == full or batches == full // batch_size + 1)
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired as exc:
                raise BrokerCheckError(f"the daemon did not stop in 60s; log {log_path}") from exc
            if code != 0:
                raise BrokerCheckError(f"the daemon exited {code} on SIGTERM; log {log_path}")
            # Measured, plus the partial batch still held if SIGTERM is what scored it.
            return int(batches) + (consumed < rows), cuts_checked, int(restored)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def _read(bootstrap: str, topic: str, timeout_seconds: float) -> list[Any]:
    """Every record of `topic` up to its current end."""
    from kafka.errors import KafkaTimeoutError

    from streamer.kafka_io import read_topic

    try:
        return read_topic(bootstrap, topic, timeout_seconds)
    except KafkaTimeoutError as exc:
        raise BrokerCheckError(str(exc)) from exc


def _read_alerts(bootstrap: str, topic: str, timeout_seconds: float) -> list[Any]:
    from streamer.records import Alert, Incident

    decode = msgspec.json.Decoder(Alert | Incident).decode
    out = []
    for record in _read(bootstrap, topic, timeout_seconds):
        doc = decode(record.value)
        if isinstance(doc, Alert):
            out.append(doc)
    return out


def _commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """Start `group` at `offset` of partition 0, as a daemon that ran up to there left it."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return int(consumer.committed(TopicPartition(topic, 0)) or 0)
    finally:
        consumer.close()
