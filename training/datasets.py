"""Read training history from JSON-lines files, through the daemon's own decoder and features."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from streamer.features import FeatureSpec, build_features, event_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class History:
    features: np.ndarray  # (n, d) unscaled, in file order
    event_seconds: np.ndarray  # (n,) event time of each row
    rejected: int  # lines that did not decode or gave non-finite features


def read_jsonl(spec: FeatureSpec, path: Path) -> History:
    """Decode every line with the spec's event type; bad lines are counted and skipped."""
    decoder = msgspec.json.Decoder(spec.event_type())
    events = []
    rejected = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                events.append(decoder.decode(line))
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                rejected += 1
                if rejected <= 5:
                    log.warning("%s:%d skipped: %s", path.name, number, exc)
    x = build_features(spec, events)
    seconds = np.array([event_seconds(spec, getattr(e, spec.time_field)) for e in events])
    finite = np.isfinite(x).all(axis=1)
    rejected += int((~finite).sum())
    if rejected:
        log.warning("%s: %d line(s) skipped in all", path.name, rejected)
    return History(x[finite], seconds[finite], rejected)
