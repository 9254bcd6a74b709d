"""Per-stage cost of `Pipeline.process` against batch size, threshold window and LSTM window
length: does any stage grow worse than linearly? No Kafka, one process, one thread.

    .venv/bin/python bench/stages.py [--bundle DIR] [--lstm-bundle DIR] [--out FILE]

1. Trains (unless given) a small dense orders bundle and a small LSTM sensors bundle
   (windows of 30 rows, LSTM 64-32-32-64), both with the numpy runtime the daemon runs.
2. Batch size (10 / 100 / 1000 / 10000 dense, 10 / 100 / 1000 / 5000 LSTM; --dense-batches,
   --lstm-batches): for each size, a fresh `build_pipeline` runs an untimed warm-up (it fills the
   threshold ring and every sensor's window), then whole passes over the same stream until
   `--min-seconds` have gone by; 3 repeats (`--repeats`), interleaved, median. It reports each
   stage's cost per event: a stage linear in the batch is flat or falling in us/event.
3. Threshold window (`threshold.window_size` 1,000 / 10,000 / 100,000, batch 1000, dense): the
   threshold stage's us/batch, measured with the ring full.
4. LSTM window length 10 / 30 / 60: `WindowBuilder.add` on the sensor stream's scaled rows
   (batches of 1000) and the score stage's work (numpy LSTM `reconstruct` plus the errors) on
   the stream's first 20,000 windows, in batches of 1000, with the trained bundle's weights
   (an LSTM's weights do not depend on the window's length; only the RepeatVector's does).

Produce and commit are not here: they happen in the app, once per commit interval, not per
batch, against a broker. bench/e2e.py's daemon stage table shows them.

OPENBLAS/OMP/MKL are pinned to one thread before numpy loads, as the daemon pins itself
(streamer/__main__.py) and as bench/e2e.py's LSTM child does. Results go to --out as JSON
(default runs/bench/stages.json, which git ignores) and to stdout as markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# One thread: set before numpy (and OpenBLAS, which reads it only once) loads. Only when run
# as the benchmark: a test that imports the helpers leaves its process's environment alone.
THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
if __name__ == "__main__":
    os.environ.update(THREADS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow loads only to train

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

# Run as `python bench/stages.py`: bench/ itself is on sys.path, so e2e imports as a module.
from e2e import (  # noqa: E402
    ROOT,
    WORKLOADS,
    _shown,
    cpu_shares,
    log,
    machine_info,
    machine_jiffies,
    make_events,
    train_bundle,
)

from streamer import bundle as bundles  # noqa: E402
from streamer import config as config_mod  # noqa: E402
from streamer.app import build_pipeline  # noqa: E402
from streamer.features import build_features  # noqa: E402
from streamer.lean import DenseLayer, Layer, LSTMLayer, NumpyLSTMScorer, RepeatLayer  # noqa: E402
from streamer.pipeline import STAGES  # noqa: E402
from streamer.records import RawMessage  # noqa: E402
from streamer.scoring import reconstruction_errors  # noqa: E402
from streamer.windows import WindowBuilder, sliding_windows  # noqa: E402

DENSE_BATCHES = (10, 100, 1000, 10_000)
LSTM_BATCHES = (10, 100, 1000, 5000)
THRESHOLD_WINDOWS = (1000, 10_000, 100_000)
THRESHOLD_BATCH = 1000
WINDOW_LENGTHS = (10, 30, 60)
WINDOW_BATCH = 1000
TOLERANCE = 0.25  # a cost within +-25% of another counts as the same (noise)
SEED = 21  # the stream's simulator seed; the LSTM bundle learns the same 20 sensors


# -- verdicts (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How a cost per unit behaves as x grows: "flat", "falls" or "RISES"."""

    word: str
    last_over_first: float
    worst_rise: float  # the largest cost(x_j) / cost(x_i) with x_i < x_j; 1.0 if none rose
    rise_from: int | None = None
    rise_to: int | None = None

    def text(self) -> str:
        if self.word == "RISES":
            return (
                f"RISES: +{100 * (self.worst_rise - 1):.0f}% from {self.rise_from:,} to "
                f"{self.rise_to:,}"
            )
        rise = f"; largest rise +{100 * (self.worst_rise - 1):.0f}%" if self.worst_rise > 1 else ""
        return f"{self.word} (last/first {self.last_over_first:.2f}x{rise})"


def scaling_verdict(
    xs: Sequence[int], costs: Sequence[float], tolerance: float = TOLERANCE
) -> Verdict:
    """`costs[i]` is a cost per unit (us/event, us/step) at `xs[i]`, xs increasing.

    RISES when some larger x costs more than `1 + tolerance` times a smaller one (worse than
    linear); otherwise "falls" when the last is below `1 - tolerance` times the first, else
    "flat"."""
    if len(xs) != len(costs) or len(xs) < 2:
        raise ValueError("need at least two (x, cost) points")
    worst = 1.0
    at: tuple[int | None, int | None] = (None, None)
    for j in range(1, len(costs)):
        for i in range(j):
            if costs[i] > 0 and costs[j] / costs[i] > worst:
                worst, at = costs[j] / costs[i], (xs[i], xs[j])
    last = costs[-1] / costs[0] if costs[0] > 0 else float("nan")
    if worst > 1 + tolerance:
        return Verdict("RISES", last, worst, at[0], at[1])
    return Verdict("falls" if last < 1 - tolerance else "flat", last, worst, at[0], at[1])


def parse_sizes(text: str) -> tuple[int, ...]:
    """--dense-batches "10,100,1000" -> (10, 100, 1000): at least two sizes, increasing."""
    try:
        sizes = tuple(int(t.replace("_", "")) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{text!r}: a comma-separated list of integers") from None
    if len(sizes) < 2 or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"{text!r}: two or more increasing sizes, each >= 1")
    return sizes


def median_by_key(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each key's median over the runs (every run has the same keys)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(us: float) -> str:
    """A cost in us, to about 3 significant digits."""
    if us >= 100:
        return f"{us:,.0f}"
    if us >= 10:
        return f"{us:.1f}"
    if us >= 1:
        return f"{us:.2f}"
    return f"{us:.3f}"


# -- one point of the batch-size sweep --------------------------------------------------------


@dataclass
class Point:
    """One fresh pipeline at one batch size: totals over the timed passes."""

    batch: int
    events: int
    batches: int
    passes: int
    seconds: float  # wall time of the timed `process` calls, the loop included
    stage_seconds: dict[str, float]
    alerts: int
    held_back: int
    threshold_count: int  # scores in the global threshold's ring at the end

    def us_per_event(self) -> dict[str, float]:
        out = {s: 1e6 * v / self.events for s, v in self.stage_seconds.items()}
        out["sum of stages"] = sum(out[s] for s in STAGES)
        out["process() wall"] = 1e6 * self.seconds / self.events
        return out

    def us_per_batch(self) -> dict[str, float]:
        return {k: v * self.events / self.batches for k, v in self.us_per_event().items()}


def pipeline_config(profile: str, batch: int, window_size: int | None = None) -> dict[str, Any]:
    """A daemon config without a broker: only the pipeline's settings matter here."""
    doc: dict[str, Any] = {
        "profile": profile,
        "kafka": {"input_topic": "bench-in", "alert_topic": "bench-a", "dead_letter_topic": "dlq"},
        "model": {"bundle": "unused", "runtime": "numpy"},
        "batch": {"max_batch_size": batch},
    }
    if window_size is not None:
        doc["threshold"] = {"window_size": window_size, "min_samples": min(500, window_size)}
    return doc


def run_point(
    b: bundles.Bundle,
    scorer: Any,
    messages: list[RawMessage],
    batch: int,
    min_seconds: float,
    warmup_events: int,
    window_size: int | None = None,
) -> Point:
    settings = config_mod.from_mapping(pipeline_config(b.spec.profile, batch, window_size))
    pipe = build_pipeline(settings, b, scorer)
    chunks = [messages[i : i + batch] for i in range(0, len(messages), batch)]
    for n in range(-(-warmup_events // batch)):  # untimed: rings and windows fill up
        pipe.process(chunks[n % len(chunks)])
    stage = dict.fromkeys(STAGES, 0.0)
    events = batches = passes = alerts = held_back = 0
    gc.collect()
    clock = time.perf_counter
    started = clock()
    while True:
        for chunk in chunks:
            result = pipe.process(chunk)
            for k, v in result.stage_seconds.items():
                stage[k] += v
            alerts += len(result.alerts)
            held_back += result.held_back
        events += len(messages)
        batches += len(chunks)
        passes += 1
        if clock() - started >= min_seconds:
            break
    seconds = clock() - started
    return Point(
        batch, events, batches, passes, seconds, stage, alerts, held_back, pipe.threshold.count
    )


def sweep(
    label: str,
    b: bundles.Bundle,
    scorer: Any,
    messages: list[RawMessage],
    sizes: Sequence[int],
    repeats: int,
    min_seconds: float,
    warmup_events: int,
    window_sizes: Sequence[int | None] | None = None,
) -> list[list[Point]]:
    """points[i][r]: size i, repeat r. Repeats are interleaved (all sizes, then again), so
    a passing disturbance spreads over the sizes instead of spoiling one."""
    windows = list(window_sizes) if window_sizes is not None else [None] * len(sizes)
    points: list[list[Point]] = [[] for _ in sizes]
    for r in range(repeats):
        for i, (size, w) in enumerate(zip(sizes, windows, strict=True)):
            batch = THRESHOLD_BATCH if window_sizes is not None else size
            warm = max(warmup_events, w or 0)
            p = run_point(b, scorer, messages, batch, min_seconds, warm, w)
            points[i].append(p)
            log(
                f"{label} {size:,} repeat {r + 1}: {p.events:,} events in {p.seconds:.2f}s "
                f"({p.passes} pass(es)), {1e6 * p.seconds / p.events:.2f} us/event"
            )
    return points


# -- LSTM window length -----------------------------------------------------------------------


def lstm_layers(weights: Path, length: int) -> list[Layer]:
    """The bundle's numpy LSTM weights (lstm_weights.npz) with a RepeatVector of `length`."""
    with np.load(weights, allow_pickle=False) as data:
        a = {name: data[name] for name in data.files}
    layers: list[Layer] = []
    sequences = [bool(s) for s in a["return_sequences"]]
    for i, kind in enumerate(str(k) for k in a["layers"]):
        if kind == "lstm":
            layers.append(
                LSTMLayer(
                    a[f"kernel_{i}"], a[f"recurrent_kernel_{i}"], a[f"bias_{i}"], sequences[i]
                )
            )
        elif kind == "repeat":
            layers.append(RepeatLayer(length))
        else:
            layers.append(DenseLayer(a[f"kernel_{i}"], a[f"bias_{i}"]))
    return layers


def timed_batches(calls: Sequence[Callable[[], object]], min_seconds: float) -> tuple[int, float]:
    """Run `calls` in turn (cycling) until `min_seconds` have gone by; (calls made, seconds)."""
    calls[0]()  # warm-up
    gc.collect()
    n, started = 0, time.perf_counter()
    while True:
        calls[n % len(calls)]()
        n += 1
        if n >= len(calls) and time.perf_counter() - started >= min_seconds:
            break
    return n, time.perf_counter() - started


def window_length_costs(
    b: bundles.Bundle, keys: list[str], rows: np.ndarray, length: int, min_seconds: float
) -> dict[str, float]:
    """us per event of `WindowBuilder.add` and of the score stage's work at `length`."""
    batch = WINDOW_BATCH
    spans = [(i, min(i + batch, len(keys))) for i in range(0, len(keys), batch)]
    # Window building: a builder that has seen the stream once (every ring full), then
    # timed passes of batches, as the daemon calls it.
    builder = WindowBuilder(length, rows.shape[1])
    for lo, hi in spans:
        builder.add(keys[lo:hi], rows[lo:hi])

    def adder(lo: int, hi: int) -> Callable[[], object]:
        return lambda: builder.add(keys[lo:hi], rows[lo:hi])

    calls, seconds = timed_batches([adder(lo, hi) for lo, hi in spans], min_seconds)
    added = sum(hi - lo for lo, hi in spans) * (calls // len(spans)) + sum(
        hi - lo for lo, hi in spans[: calls % len(spans)]
    )
    build_us = 1e6 * seconds / added

    # Scoring: the score stage's work on batches of real windows of this length.
    scorer = NumpyLSTMScorer(length, lstm_layers(b.path / bundles.LSTM_WEIGHTS_FILE, length))
    windows = sliding_windows(keys, rows, length)[0][: 20 * batch]
    parts = [windows[i : i + batch] for i in range(0, windows.shape[0], batch)]

    def score(w: np.ndarray) -> Callable[[], object]:
        def run() -> object:
            errors = reconstruction_errors(w, scorer.reconstruct(w)).mean(axis=1)
            return errors.mean(axis=1)

        return run

    calls, seconds = timed_batches([score(w) for w in parts], min_seconds)
    scored = sum(p.shape[0] for p in parts) * (calls // len(parts)) + sum(
        p.shape[0] for p in parts[: calls % len(parts)]
    )
    return {"window build": build_us, "score": 1e6 * seconds / scored}


# -- report -----------------------------------------------------------------------------------


def batch_table(
    sizes: Sequence[int], medians: list[dict[str, float]]
) -> tuple[str, dict[str, Verdict]]:
    """us/event per stage (rows) by batch size (columns), with each row's verdict."""
    head = "| us/event | " + " | ".join(f"batch {s:,}" for s in sizes) + " | verdict |"
    lines = [head, "|---|" + "---:|" * len(sizes) + "---|"]
    verdicts: dict[str, Verdict] = {}
    for key in medians[0]:
        costs = [m[key] for m in medians]
        v = scaling_verdict(sizes, costs)
        verdicts[key] = v
        cells = " | ".join(fmt(c) for c in costs)
        lines.append(f"| {key} | {cells} | {v.text()} |")
    rates = " | ".join(f"{1e6 / m['process() wall']:,.0f}" for m in medians)
    lines.append(f"| events/s (process() wall) | {rates} | |")
    return "\n".join(lines), verdicts


def threshold_table(
    windows: Sequence[int], per_batch: list[dict[str, float]], counts: list[int]
) -> tuple[str, Verdict]:
    lines = [
        "| threshold.window_size | scores in the ring | threshold us/batch "
        "| us/batch per 1,000 ring entries | sum of stages us/batch |",
        "|---:|---:|---:|---:|---:|",
    ]
    per_k = [m["threshold"] / (w / 1000) for m, w in zip(per_batch, windows, strict=True)]
    for w, m, c, k in zip(windows, per_batch, counts, per_k, strict=True):
        lines.append(
            f"| {w:,} | {c:,} | {fmt(m['threshold'])} | {fmt(k)} | {fmt(m['sum of stages'])} |"
        )
    return "\n".join(lines), scaling_verdict(windows, per_k)


def window_table(
    lengths: Sequence[int], costs: list[dict[str, float]]
) -> tuple[str, dict[str, Verdict]]:
    lines = [
        "| window length | window build us/event | per step | score us/event | per step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, c in zip(lengths, costs, strict=True):
        lines.append(
            f"| {n} | {fmt(c['window build'])} | {fmt(c['window build'] / n)} | "
            f"{fmt(c['score'])} | {fmt(c['score'] / n)} |"
        )
    verdicts = {
        k: scaling_verdict(lengths, [c[k] / n for c, n in zip(costs, lengths, strict=True)])
        for k in ("window build", "score")
    }
    return "\n".join(lines), verdicts


def machine() -> dict[str, Any]:
    """e2e's machine details (no broker here) and the thread settings this run pinned."""
    info = machine_info("none: no Kafka in this benchmark")
    info["threads"] = {k: os.environ.get(k, "unset") for k in THREADS}
    info["msgspec"] = metadata.version("msgspec")
    return info


# -- main -------------------------------------------------------------------------------------


@dataclass
class Workload:
    b: bundles.Bundle
    scorer: Any
    messages: list[RawMessage]
    keys: list[str] = field(default_factory=list)


def load_workload(
    model: str, path: Path | None, workdir: Path, epochs: int, events: int
) -> Workload:
    w = WORKLOADS[model]
    if path is None:
        log(f"training a small {model} bundle ({epochs} epochs)")
        (workdir / model).mkdir()
        # As bench/e2e.py: dense on its own clean orders, LSTM on the stream's 20 sensors.
        seed = {"seed": SEED} if model == "lstm" else {}
        path = train_bundle(workdir / model, epochs, model, **seed)
    b = bundles.load(path.resolve(), expected_spec=w.spec)
    if b.kind != model:
        raise SystemExit(f"{path}: a {b.kind} bundle, not {model}")
    log(f"simulating {events:,} {w.noun}")
    values, keys = make_events(w, events, 0.01, SEED)
    messages = [RawMessage("bench", 0, i, None, v, 0) for i, v in enumerate(values)]
    return Workload(b, b.load_scorer("numpy"), messages, [k.decode() for k in keys])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bundle", type=Path, help="a dense orders bundle (default: train)")
    parser.add_argument("--lstm-bundle", type=Path, help="an LSTM sensors bundle (default: train)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs when training a bundle")
    parser.add_argument("--dense-events", type=int, default=100_000, help="the orders stream")
    parser.add_argument("--lstm-events", type=int, default=50_000, help="the sensor stream")
    parser.add_argument(
        "--dense-batches", default=",".join(map(str, DENSE_BATCHES)), help="batch sizes, dense"
    )
    parser.add_argument(
        "--lstm-batches", default=",".join(map(str, LSTM_BATCHES)), help="batch sizes, LSTM"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timed time per point")
    parser.add_argument("--warmup", type=int, default=20_000, help="untimed events per point")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "stages.json")
    args = parser.parse_args(argv)
    try:
        dense_sizes, lstm_sizes = parse_sizes(args.dense_batches), parse_sizes(args.lstm_batches)
    except ValueError as exc:
        parser.error(str(exc))
    for n, sizes in ((args.dense_events, dense_sizes), (args.lstm_events, lstm_sizes)):
        if n < max(sizes):
            parser.error(f"a stream of {n:,} events is shorter than batch {max(sizes):,}")
    command = " ".join(["bench/stages.py", *(sys.argv[1:] if argv is None else argv)])
    run_started = time.monotonic()
    info = machine()

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        dense = load_workload("dense", args.bundle, Path(tmp), args.epochs, args.dense_events)
        lstm = load_workload("lstm", args.lstm_bundle, Path(tmp), args.epochs, args.lstm_events)
        assert lstm.b.window_length is not None
        log(f"measuring; load average {os.getloadavg()[0]:.2f}")
        info["load_average_before_measuring"] = list(os.getloadavg())
        cpu0, jiffies0, wall0 = time.process_time(), machine_jiffies(), time.monotonic()

        rep, mins, warm = args.repeats, args.min_seconds, args.warmup
        d = sweep(
            "dense batch", dense.b, dense.scorer, dense.messages, dense_sizes, rep, mins, warm
        )
        ls = sweep("lstm batch", lstm.b, lstm.scorer, lstm.messages, lstm_sizes, rep, mins, warm)
        t = sweep(
            "threshold window", dense.b, dense.scorer, dense.messages, THRESHOLD_WINDOWS,
            rep, mins, warm, THRESHOLD_WINDOWS,
        )  # fmt: skip
        # Window length: the sensor stream's own scaled rows (its features are stateless).
        decode = msgspec.json.Decoder(lstm.b.spec.event_type()).decode
        raw = build_features(lstm.b.spec, [decode(m.value or b"") for m in lstm.messages])
        rows = lstm.b.scaler.transform(raw).astype(np.float32)
        wl_runs: list[list[dict[str, float]]] = [[] for _ in WINDOW_LENGTHS]
        for r in range(rep):
            for i, n in enumerate(WINDOW_LENGTHS):
                c = window_length_costs(lstm.b, lstm.keys, rows, n, mins)
                wl_runs[i].append(c)
                log(f"window length {n} repeat {r + 1}: {c}")

        measured = time.monotonic() - wall0
        cpu_used = time.process_time() - cpu0
        shares = cpu_shares(jiffies0, machine_jiffies())
        info["load_average_at_end"] = list(os.getloadavg())

    dense_med = [median_by_key([p.us_per_event() for p in pts]) for pts in d]
    lstm_med = [median_by_key([p.us_per_event() for p in pts]) for pts in ls]
    thr_med = [median_by_key([p.us_per_batch() for p in pts]) for pts in t]
    thr_counts = [pts[-1].threshold_count for pts in t]
    wl_med = [median_by_key(runs) for runs in wl_runs]
    dense_tab, dense_v = batch_table(dense_sizes, dense_med)
    lstm_tab, lstm_v = batch_table(lstm_sizes, lstm_med)
    thr_tab, thr_v = threshold_table(THRESHOLD_WINDOWS, thr_med, thr_counts)
    wl_tab, wl_v = window_table(WINDOW_LENGTHS, wl_med)
    busy = 100 - shares["idle"] - shares["iowait"] - shares["steal"]

    def points(pts: list[list[Point]]) -> list[list[dict[str, Any]]]:
        return [[asdict(p) for p in row] for row in pts]

    results = {
        "command": command,
        "machine": info,
        "settings": {
            "repeats": rep,
            "min_seconds": mins,
            "warmup_events": warm,
            "tolerance": TOLERANCE,
            "runtime": "numpy",
            "dense": {"events": len(dense.messages), "bundle": dense.b.version},
            "lstm": {
                "events": len(lstm.messages),
                "entities": len(set(lstm.keys)),
                "bundle": lstm.b.version,
                "window_length": lstm.b.window_length,
            },
            "bundles_trained_here": [
                m for m, given in (("dense", args.bundle), ("lstm", args.lstm_bundle)) if not given
            ],
        },
        "measuring": {
            "seconds": measured,
            "process_cpu_percent_of_one_core": 100 * cpu_used / measured,
            "machine_busy_percent": busy,
            "machine_cpu_percent_by_state": shares,
        },
        "dense_batch": {
            "sizes": dense_sizes,
            "median_us_per_event": dense_med,
            "verdicts": {k: asdict(v) for k, v in dense_v.items()},
            "points": points(d),
        },
        "lstm_batch": {
            "sizes": lstm_sizes,
            "median_us_per_event": lstm_med,
            "verdicts": {k: asdict(v) for k, v in lstm_v.items()},
            "points": points(ls),
        },
        "threshold_window": {
            "window_sizes": THRESHOLD_WINDOWS,
            "batch": THRESHOLD_BATCH,
            "median_us_per_batch": thr_med,
            "verdict_per_1000_entries": asdict(thr_v),
            "points": points(t),
        },
        "lstm_window_length": {
            "lengths": WINDOW_LENGTHS,
            "batch": WINDOW_BATCH,
            "median_us_per_event": wl_med,
            "verdicts_per_step": {k: asdict(v) for k, v in wl_v.items()},
            "runs": wl_runs,
        },
        "seconds_total": time.monotonic() - run_started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"\n{command}; {info['date_utc']}; nproc {info['nproc']}, Python {info['python']}, "
        f"numpy {info['numpy']}; "
        + ", ".join(f"{k}={v}" for k, v in info["threads"].items())
        + f"\nload average {info['load_average_before_measuring'][0]:.2f} before measuring, "
        f"{info['load_average_at_end'][0]:.2f} at the end; while measuring ({measured:.0f}s) "
        f"this process used {100 * cpu_used / measured:.0f}% of a core and the machine's "
        f"{info['nproc']} CPUs were {busy:.0f}% busy + {shares['steal']:.0f}% steal"
    )
    print(
        f"\nDense (orders, {len(dense.messages):,}-event stream, numpy runtime): us/event, "
        f"median of {rep}\n\n{dense_tab}"
    )
    print(
        f"\nLSTM (sensors, {len(set(lstm.keys))} sensors, windows of {lstm.b.window_length}, "
        f"{len(lstm.messages):,}-event stream, numpy runtime): us/event, median of {rep}; "
        f"`scale` includes WindowBuilder.add\n\n{lstm_tab}"
    )
    print(
        f"\nThreshold window (dense, batch {THRESHOLD_BATCH}): us/batch, median of {rep}"
        f"\n\n{thr_tab}\n\nthreshold us/batch per 1,000 ring entries: {thr_v.text()}"
    )
    print(
        f"\nLSTM window length (batches of {WINDOW_BATCH}, {len(set(lstm.keys))} sensors): "
        f"us/event, median of {rep}\n\n{wl_tab}\n"
    )
    for k, v in wl_v.items():
        print(f"{k} us/event per step: {v.text()}")
    flagged = [
        f"{where}: {k} {v.text()}"
        for where, vs in (("dense", dense_v), ("lstm", lstm_v))
        for k, v in vs.items()
        if v.word == "RISES"
    ]
    flagged += [f"threshold window: {thr_v.text()}"] if thr_v.word == "RISES" else []
    flagged += [f"window length: {k} {v.text()}" for k, v in wl_v.items() if v.word == "RISES"]
    print("\nrising (worse than linear, beyond +-25%): " + ("; ".join(flagged) or "none"))
    print(f"\nresults written to {_shown(args.out)}")
    log(f"done in {time.monotonic() - run_started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
