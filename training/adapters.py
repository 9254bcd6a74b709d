"""Readers that turn a labeled data set on disk into series of events for the evaluator.

Every adapter returns `Series`: one stream of events in time order, with per-row labels kept
apart from the events (a label never travels inside an event), and the row where its test
part starts. Column names become event fields in snake case (`Volume Flow RateRMS` ->
`volume_flow_raterms`), and every event also carries three fields an eval config's feature
spec can use: `series` (the series name, a natural entity field), `ts` (event time in POSIX
seconds: `time_format = "epoch_s"`) and `row` (the row number in its series, an id field).

Adapters: `csv` and `jsonl` (one file per series, or one file split by a column), and
`smd_npz` (the Server Machine Dataset's arrays; one series per machine).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from training.nab import probation_rows, windows_from_times

SYNTHETIC_FIELDS = ("series", "ts", "row")


class SplitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which leading rows of each series are the training part; exactly one rule applies."""

    train_rows: int | None = None  # the first N rows (SKAB: 400)
    train_until: str | None = None  # rows before this ISO time (ULB: "2018-07-01T00:00:00")
    nab_probation: bool = False  # NAB's probationary period: min(floor(0.15 n), 750) rows

    def __post_init__(self) -> None:
        chosen = [self.train_rows is not None, self.train_until is not None, self.nab_probation]
        if sum(chosen) > 1:
            raise ValueError("data.split: set only one of train_rows, train_until, nab_probation")
        if self.train_rows is not None and self.train_rows < 1:
            raise ValueError("data.split.train_rows must be >= 1")


class DataSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the events are and how to read them; paths are relative to the working dir."""

    adapter: Literal["csv", "jsonl", "smd_npz"]
    path: str
    files: list[str] = msgspec.field(default_factory=lambda: ["*.csv"])  # globs under path
    exclude: list[str] = msgspec.field(default_factory=list)  # globs to leave out
    delimiter: str = ","
    time_column: str | None = None  # None: row number x row_seconds
    time_format: str = "iso8601"  # iso8601 (naive = UTC) | epoch_s | epoch_ms | strptime format
    row_seconds: float = 60.0
    label_column: str | None = None  # 0/1 per row
    label_windows: str | None = None  # NAB-style JSON: {file under path: [[start, end], ...]}
    class_column: str | None = None  # per-row anomaly class, reported as per-class recall
    drop_columns: list[str] = msgspec.field(default_factory=list)  # label-like columns
    series_column: str | None = None  # split each file into series by this column
    split: SplitSettings = msgspec.field(default_factory=SplitSettings)
    max_series: int | None = None  # first N series only (quick runs)

    def __post_init__(self) -> None:
        if self.adapter != "smd_npz" and (self.label_column is None) == (
            self.label_windows is None
        ):
            raise ValueError("data: set exactly one of label_column and label_windows")


@dataclass
class Series:
    """One labeled stream: rows [0, n_train) train, rows [n_train, n) are replayed and scored."""

    name: str
    group: str  # a folder or machine family, for per-group results
    columns: dict[str, np.ndarray]  # event fields (snake case), one value per row
    seconds: np.ndarray  # event time, POSIX seconds, non-decreasing
    labels: np.ndarray  # int8, 1 = anomalous row
    n_train: int
    windows: list[tuple[int, int]] | None = None  # labeled windows as rows (NAB), both ends
    classes: np.ndarray | None = None  # per-row anomaly class

    @property
    def n(self) -> int:
        return int(self.labels.size)

    def event_rows(self, fields: list[str], start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows [start, stop) as JSON-ready dicts holding only `fields`."""
        cols: list[list[Any]] = []
        for name in fields:
            if name == "series":
                cols.append([self.name] * (stop - start))
            elif name == "ts":
                cols.append(self.seconds[start:stop].tolist())
            elif name == "row":
                cols.append(list(range(start, stop)))
            else:
                cols.append(self.columns[name][start:stop].tolist())
        for values in zip(*cols, strict=True):
            yield dict(zip(fields, values, strict=True))


def snake(name: str) -> str:
    """A column name as an event field name.

    >>> snake("Volume Flow RateRMS"), snake("TX_AMOUNT")
    ('volume_flow_raterms', 'tx_amount')
    """
    return re.sub(r"\W+", "_", name).strip("_").lower()


def load(data: DataSettings) -> list[Series]:
    """Read every series the settings describe, in a stable order."""
    series = _smd(data) if data.adapter == "smd_npz" else _tabular(data)
    if data.max_series is not None:
        series = series[: data.max_series]
    if not series:
        raise ValueError(f"{data.path}: no series found (files {data.files})")
    return series


# -- csv / jsonl -------------------------------------------------------------------------------


def _files(data: DataSettings) -> list[tuple[Path, str]]:
    root = Path(data.path)
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {data.path} does not exist")
    found: dict[str, Path] = {}
    for pattern in data.files:
        for p in root.glob(pattern):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not any(Path(rel).match(x) for x in data.exclude):
                found[rel] = p
    # Natural order, so 10.csv follows 9.csv.
    return [(found[r], r) for r in sorted(found, key=_natural)]


def _natural(text: str) -> list[Any]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text) if t]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8", newline="")


def _read_records(path: Path, data: DataSettings) -> dict[str, list[Any]]:
    """A file as columns of raw values (strings for CSV, JSON values for JSONL)."""
    columns: dict[str, list[Any]] = {}
    with _open_text(path) as f:
        if data.adapter == "csv":
            reader = csv.reader(f, delimiter=data.delimiter)
            header = next(reader)
            cols: list[list[Any]] = [[] for _ in header]
            for row in reader:
                if not row:
                    continue
                for c, value in zip(cols, row, strict=True):
                    c.append(value)
            columns = dict(zip(header, cols, strict=True))
        else:
            for number, line in enumerate(f):
                if not line.strip():
                    continue
                doc = json.loads(line)
                for k, v in doc.items():
                    columns.setdefault(k, [None] * number).append(v)
                for k, c in columns.items():
                    if k not in doc:
                        c.append(None)
    return columns


def _as_array(values: list[Any]) -> np.ndarray:
    """Integers as int64 (ids stay ids), other numbers as float64, anything else as objects.

    >>> [_as_array(v).dtype.name for v in (["1", "2"], ["1", "2.5"], ["a", "1"], [1, None])]
    ['int64', 'float64', 'object', 'object']
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    if arr.dtype.kind in "US":
        for kind in (np.int64, np.float64):
            try:
                return arr.astype(kind)
            except ValueError:
                continue
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.array(values, dtype=object)


def parse_times(values: list[Any], time_format: str) -> np.ndarray:
    """Time values -> POSIX seconds; a naive ISO time is read as UTC.

    >>> parse_times(["2020-03-01 15:44:06"], "iso8601").tolist()
    [1583077446.0]
    """
    if time_format == "epoch_s":
        return np.array([float(v) for v in values], dtype=np.float64)
    if time_format == "epoch_ms":
        return np.array([float(v) / 1000.0 for v in values], dtype=np.float64)

    def one(text: str) -> float:
        if time_format == "iso8601":
            t = datetime.fromisoformat(text)
        else:
            t = datetime.strptime(text, time_format)
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.timestamp()

    return np.array([one(str(v)) for v in values], dtype=np.float64)


def _tabular(data: DataSettings) -> list[Series]:
    windows_doc: dict[str, list[list[str]]] | None = None
    if data.label_windows is not None:
        windows_doc = json.loads(Path(data.label_windows).read_text())
    out: list[Series] = []
    for path, rel in _files(data):
        raw = _read_records(path, data)
        n = len(next(iter(raw.values()), []))
        if n == 0:
            continue
        if data.time_column is not None:
            seconds = parse_times(raw.pop(data.time_column), data.time_format)
        else:
            seconds = np.arange(n, dtype=np.float64) * data.row_seconds
        labels = np.zeros(n, dtype=np.int8)
        if data.label_column is not None:
            labels = (_as_array(raw.pop(data.label_column)) > 0).astype(np.int8)
        classes = _as_array(raw.pop(data.class_column)) if data.class_column else None
        for name in data.drop_columns:
            raw.pop(name, None)
        columns = {snake(k): _as_array(v) for k, v in raw.items()}
        group = str(Path(rel).parent) if "/" in rel else Path(rel).stem
        windows_rows: list[tuple[int, int]] | None = None
        order = np.argsort(seconds, kind="stable")
        if not np.array_equal(order, np.arange(n)):
            seconds, labels = seconds[order], labels[order]
            columns = {k: v[order] for k, v in columns.items()}
            classes = classes[order] if classes is not None else None
        if windows_doc is not None:
            if rel not in windows_doc:
                raise ValueError(f"{data.label_windows}: no entry for {rel}")
            spans = [
                (parse_times([a], "iso8601")[0], parse_times([b], "iso8601")[0])
                for a, b in windows_doc[rel]
            ]
            windows_rows = [(w.left, w.right) for w in windows_from_times(seconds, spans)]
            for a, b in windows_rows:
                labels[a : b + 1] = 1
        whole: list[tuple[Any, np.ndarray | slice]] = [(None, slice(None))]
        pieces = _split_by(columns, data.series_column) if data.series_column else whole
        for key, rows in pieces:
            s_seconds = seconds[rows]
            out.append(
                Series(
                    name=rel if key is None else f"{rel}:{key}",
                    group=group,
                    columns={k: v[rows] for k, v in columns.items()},
                    seconds=s_seconds,
                    labels=labels[rows],
                    n_train=_n_train(data.split, s_seconds),
                    windows=windows_rows if key is None else None,
                    classes=classes[rows] if classes is not None else None,
                )
            )
    return out


def _split_by(columns: dict[str, np.ndarray], column: str) -> list[tuple[Any, np.ndarray | slice]]:
    values = columns[snake(column)]
    return [(k, np.flatnonzero(values == k)) for k in sorted(set(values.tolist()), key=str)]


def _n_train(split: SplitSettings, seconds: np.ndarray) -> int:
    n = int(seconds.size)
    if split.train_rows is not None:
        return min(split.train_rows, n)
    if split.train_until is not None:
        until = parse_times([split.train_until], "iso8601")[0]
        return int(np.searchsorted(seconds, until, side="left"))
    if split.nab_probation:
        return probation_rows(n)
    return 0


# -- SMD ---------------------------------------------------------------------------------------


def _smd(data: DataSettings) -> list[Series]:
    """SMD: `machine_X_Y_train`, `_test`, `_test_label`; train then test is one stream."""
    arrays = np.load(Path(data.path))
    machines = sorted(k[: -len("_train")] for k in arrays.files if k.endswith("_train"))
    out: list[Series] = []
    for m in machines:
        train = np.asarray(arrays[f"{m}_train"], dtype=np.float64)
        test = np.asarray(arrays[f"{m}_test"], dtype=np.float64)
        x = np.concatenate([train, test])
        labels = np.concatenate(
            [np.zeros(len(train), np.int8), np.asarray(arrays[f"{m}_test_label"], np.int8)]
        )
        width = len(str(x.shape[1] - 1))
        out.append(
            Series(
                name=m,
                group=m.rsplit("_", 1)[0],
                columns={f"m{j:0{width}d}": x[:, j] for j in range(x.shape[1])},
                seconds=np.arange(x.shape[0], dtype=np.float64) * data.row_seconds,
                labels=labels,
                n_train=len(train),
            )
        )
    return out
