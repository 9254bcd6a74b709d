"""Versioned model bundles: write once at training, verify on every load.

A bundle is a directory:

    model.keras          the Keras autoencoder (loaded with safe_mode, never pickle)
    dense_weights.npz    a dense model's weights as plain arrays, for the numpy runtime
    dense_window_weights.npz  the same for a dense model over windows
    lstm_weights.npz     an LSTM model's weights as plain arrays, for the numpy runtime
    parity.json          a few scaled rows (LSTM: windows) and Keras's reconstruction of
                         them: whatever runtime serves the bundle must reproduce them
    scaler.json          Scaler (standard or robust) fitted on the training features
    feature_spec.json    the FeatureSpec the model was trained with
    threshold.json       held-out (or, with training.warm_start_folds, every history row's
                         out-of-fold) scores: the threshold's warm start
    drift.json           the training distribution of each scaled feature and of the
                         held-out scores, for drift monitoring (streamer/drift.py); optional
    manifest.json        version, creation time, data summary, training metrics, file hashes

The manifest's `model_kind` says which model the bundle holds: "dense" scores one event's
scaled row, "lstm" and "dense_window" the window of its entity's last `window_length` rows
(manifest field; null for dense), built by streamer/windows.py at training and serving time
alike ("dense_window" flattens the window into one dense autoencoder's input). Only the
weights file of the bundle's kind is written; the numpy runtime loads the one its kind needs.

The version is a hash of the other files' contents, so two bundles with one version are the
same model. A registry is a directory of bundles plus a `current` file naming one version.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamer.drift import DriftReference
from streamer.features import FeatureSpec
from streamer.scaler import Scaler

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
SCALER_FILE = "scaler.json"
SPEC_FILE = "feature_spec.json"
THRESHOLD_FILE = "threshold.json"
MANIFEST_FILE = "manifest.json"
DENSE_WEIGHTS_FILE = "dense_weights.npz"
LSTM_WEIGHTS_FILE = "lstm_weights.npz"
DENSE_WINDOW_WEIGHTS_FILE = "dense_window_weights.npz"
PARITY_FILE = "parity.json"
DRIFT_FILE = "drift.json"
CONTENT_FILES = (MODEL_FILE, SCALER_FILE, SPEC_FILE, THRESHOLD_FILE)
# Hashed and verified when the manifest lists them (bundles written before them lack them,
# and a bundle has only its own kind's weights file).
OPTIONAL_FILES = (
    DENSE_WEIGHTS_FILE, LSTM_WEIGHTS_FILE, DENSE_WINDOW_WEIGHTS_FILE, PARITY_FILE, DRIFT_FILE
)  # fmt: skip
# model_kind -> the weights file its numpy runtime loads.
NUMPY_WEIGHTS = {
    "dense": DENSE_WEIGHTS_FILE,
    "lstm": LSTM_WEIGHTS_FILE,
    "dense_window": DENSE_WINDOW_WEIGHTS_FILE,
}
# Largest runtime-vs-Keras difference allowed, relative to the largest value in the check
# (at least 1): float32 sums of values in the thousands (a robust scaler's outliers) differ
# between BLAS builds by more than 1e-4 in absolute terms without either being wrong.
PARITY_TOLERANCE = 1e-4
CURRENT_FILE = "current"
CANDIDATE_FILE = "candidate"  # a version shadow-scored beside `current` (streamer/shadow.py)


class BundleError(Exception):
    """A bundle that must not be served; the message names the file or field at fault."""


# omit_defaults: a field left at its default is not written, so a bundle that does not use
# a later field still loads in daemons that predate it (and one that does is refused there).
class Manifest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    format_version: int
    version: str
    model_kind: str
    created_at: str
    feature_names: list[str]
    files: dict[str, str]  # file name -> sha256
    data: dict[str, Any]
    training: dict[str, Any]
    # Appended with a default: manifests written before it (all dense) still decode.
    window_length: int | None = None  # rows per window; None: one row per event
    # training.error_cap: the most a feature's squared error adds to an event's score.
    error_cap: float | None = None
    # training.score_weights resolved: one weight per feature; None: all equal.
    score_weights: list[float] | None = None
    # training.forecast: a dense_window model rebuilds a window's last row from the rows
    # before it, and an event's score is that row's error alone (not the window's mean); a
    # dense model predicts its scored features from the context ones (nothing to change
    # at scoring: the weights already leave the context out of the score).
    forecast: bool = False


class Parity(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[Any]  # scaled feature rows (n, d), or windows (n, window_length, d)
    reconstructed: list[Any]  # what Keras made of them at training time


class WarmStart(msgspec.Struct, forbid_unknown_fields=True):
    # Held-out scores in event order; with training.warm_start_folds, every history row's
    # out-of-fold score.
    errors: list[float]
    quantiles: dict[str, float]
    # Each scaled feature's min and max over the training period's rows (train and held
    # out): where threshold.range_tolerance starts. Absent in bundles written before it.
    feature_low: list[float] | None = None
    feature_high: list[float] | None = None


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    spec: FeatureSpec
    scaler: Scaler
    warm_start: np.ndarray
    # The training distributions (drift.json); None for a bundle written without them.
    drift: DriftReference | None = None
    # Each scaled feature's (min, max) over the training rows; None in older bundles.
    feature_range: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def kind(self) -> str:
        return self.manifest.model_kind

    @property
    def window_length(self) -> int | None:
        """Rows per window the model scores; None for a model of single rows (dense)."""
        return self.manifest.window_length

    @property
    def error_cap(self) -> float | None:
        return self.manifest.error_cap

    @property
    def forecast(self) -> bool:
        return self.manifest.forecast

    @property
    def score_weights(self) -> np.ndarray | None:
        w = self.manifest.score_weights
        return None if w is None else np.array(w, dtype=np.float64)

    def load_scorer(self, runtime: str = "numpy") -> Any:
        """The scorer for `runtime`: "numpy" (no TensorFlow import) or "tensorflow"."""
        loader: Callable[[Path], Any]
        if runtime == "numpy":
            from streamer.lean import NumpyDenseScorer, NumpyDenseWindowScorer, NumpyLSTMScorer

            weights = NUMPY_WEIGHTS.get(self.kind)
            if weights is None:
                raise BundleError(
                    f"{MANIFEST_FILE}: model_kind {self.kind!r} has no numpy runtime (known: "
                    f'{", ".join(sorted(NUMPY_WEIGHTS))}); set model.runtime = "tensorflow"'
                )
            if weights not in self.manifest.files:
                raise BundleError(
                    f'{self.path}: model.runtime = "numpy" needs {weights}, which '
                    'this bundle lacks; retrain it, or set model.runtime = "tensorflow"'
                )
            loaders: dict[str, Callable[[Path], Any]] = {
                "dense": NumpyDenseScorer.load,
                "lstm": NumpyLSTMScorer.load,
                "dense_window": NumpyDenseWindowScorer.load,
            }
            loader, file = loaders[self.kind], self.path / weights
        else:
            from streamer.scoring import KerasScorer

            loader, file = (lambda p: KerasScorer.load(p, self.kind)), self.path / MODEL_FILE
        try:
            scorer = loader(file)
        except Exception as exc:  # Keras and numpy raise many types for one bad file
            raise BundleError(f"{file}: cannot load model: {exc}") from exc
        if scorer.n_features != len(self.spec.feature_names()):
            raise BundleError(
                f"{MODEL_FILE}: model takes {scorer.n_features} features, "
                f"feature spec builds {len(self.spec.feature_names())}"
            )
        if scorer.window_length != self.window_length:
            raise BundleError(
                f"{file.name}: model takes windows of {scorer.window_length} rows, "
                f"{MANIFEST_FILE} says window_length = {self.window_length}"
            )
        self._check_parity(scorer, runtime)
        return scorer

    def _check_parity(self, scorer: Any, runtime: str) -> None:
        """The scorer must rebuild the stored rows (or windows) as Keras did at training."""
        if PARITY_FILE not in self.manifest.files:
            return
        parity = msgspec.json.decode((self.path / PARITY_FILE).read_bytes(), type=Parity)
        inputs = np.array(parity.inputs, dtype=np.float32)
        diff, allowed = parity_gap(
            inputs, scorer.reconstruct(inputs), np.array(parity.reconstructed, np.float32)
        )
        if not diff <= allowed:
            raise BundleError(
                f"{PARITY_FILE}: the {runtime} runtime differs from the training-time "
                f"reconstruction by {diff:.3g} (> {allowed:.3g})"
            )


def parity_gap(inputs: np.ndarray, got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(largest |got - want|, the most allowed: PARITY_TOLERANCE x the largest magnitude).

    >>> parity_gap(np.ones(2), np.array([1.0, 2.0]), np.array([1.0, 2.00005]))[0] < 1e-4
    True
    >>> big = np.array([3e3, 1.0])
    >>> diff, allowed = parity_gap(big, big, big + [0.05, 0.0])
    >>> round(diff, 2), round(allowed, 2)
    (0.05, 0.3)
    """
    magnitude = max(1.0, float(np.max(np.abs(inputs))), float(np.max(np.abs(want))))
    return float(np.max(np.abs(got - want))), PARITY_TOLERANCE * magnitude


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_version(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}={files[name]}\n".encode())
    return h.hexdigest()[:16]


def current_version(registry: Path) -> str | None:
    """The version a registry's `current` file names; None for a plain bundle directory."""
    return _pointer(registry, CURRENT_FILE)


def candidate_version(registry: Path) -> str | None:
    """The version a registry's `candidate` file names (shadow scoring); None without one."""
    return _pointer(registry, CANDIDATE_FILE)


def _pointer(registry: Path, name: str) -> str | None:
    try:
        return (registry / name).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def resolve(path: Path) -> Path:
    """A bundle directory, or a registry directory whose `current` file names one."""
    version = current_version(path)
    return path / version if version else path


def set_current(registry: Path, version: str) -> None:
    """Point the registry at a version atomically (a reader never sees a half-written file)."""
    _set_pointer(registry, CURRENT_FILE, version)


def set_candidate(registry: Path, version: str | None) -> None:
    """Name the version to shadow-score beside `current`; None removes the candidate."""
    if version is None:
        (registry / CANDIDATE_FILE).unlink(missing_ok=True)
    else:
        _set_pointer(registry, CANDIDATE_FILE, version)


def _set_pointer(registry: Path, name: str, version: str) -> None:
    tmp = registry / f".{name}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, registry / name)


def load(path: Path, expected_spec: FeatureSpec | None = None) -> Bundle:
    """Read and verify a bundle; raise BundleError naming what is wrong."""
    root = resolve(Path(path))
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a model bundle (no {MANIFEST_FILE})")
    try:
        manifest = msgspec.json.decode(manifest_path.read_bytes(), type=Manifest)
    except msgspec.DecodeError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_FILE}: format_version {manifest.format_version} is not {FORMAT_VERSION}"
        )
    if manifest.error_cap is not None and not manifest.error_cap > 0:
        raise BundleError(f"{MANIFEST_FILE}: error_cap must be > 0, not {manifest.error_cap}")
    w = manifest.score_weights
    if w is not None and (len(w) != len(manifest.feature_names) or min(w) < 0 or not sum(w) > 0):
        raise BundleError(
            f"{MANIFEST_FILE}: score_weights must be one weight >= 0 per feature "
            f"({len(manifest.feature_names)}), not all 0; got {w}"
        )
    if manifest.forecast and manifest.model_kind not in ("dense_window", "dense"):
        raise BundleError(
            f"{MANIFEST_FILE}: forecast needs model_kind 'dense_window' or 'dense', not "
            f"{manifest.model_kind!r}"
        )
    if manifest.forecast and manifest.model_kind == "dense" and 0 not in (w or []):
        raise BundleError(
            f"{MANIFEST_FILE}: forecast on a dense model needs score_weights with a 0 "
            "(the context it predicts from)"
        )
    for name in CONTENT_FILES:
        file = root / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from bundle")
        want = manifest.files.get(name)
        if want is None:
            raise BundleError(f"{MANIFEST_FILE}: files.{name} has no hash")
        if sha256_file(file) != want:
            raise BundleError(f"{file}: sha256 does not match the manifest (corrupt or tampered)")
    for name in manifest.files:
        if name not in CONTENT_FILES + OPTIONAL_FILES:
            raise BundleError(f"{MANIFEST_FILE}: files.{name} is not a bundle file")
        if name in OPTIONAL_FILES and sha256_file(root / name) != manifest.files[name]:
            raise BundleError(f"{root / name}: sha256 does not match the manifest")
    if content_version(manifest.files) != manifest.version:
        raise BundleError(f"{MANIFEST_FILE}: version does not match the file hashes")

    try:
        spec = msgspec.json.decode((root / SPEC_FILE).read_bytes(), type=FeatureSpec)
        scaler = Scaler.from_json((root / SCALER_FILE).read_bytes())
        warm = msgspec.json.decode((root / THRESHOLD_FILE).read_bytes(), type=WarmStart)
    except (msgspec.DecodeError, ValueError) as exc:
        raise BundleError(f"{root}: {exc}") from exc
    drift = None
    if DRIFT_FILE in manifest.files:
        try:
            drift = msgspec.json.decode((root / DRIFT_FILE).read_bytes(), type=DriftReference)
        except msgspec.DecodeError as exc:
            raise BundleError(f"{root / DRIFT_FILE}: {exc}") from exc
    if expected_spec is not None and spec != expected_spec:
        raise BundleError(
            f"{SPEC_FILE}: the bundle's feature spec differs from the configured one "
            f"({spec_difference(spec, expected_spec)})"
        )
    if scaler.feature_names != spec.feature_names():
        raise BundleError(f"{SCALER_FILE}: feature_names differ from the feature spec's")
    if manifest.feature_names != spec.feature_names():
        raise BundleError(f"{MANIFEST_FILE}: feature_names differ from the feature spec's")
    if drift is not None and list(drift.features) != spec.feature_names():
        raise BundleError(f"{DRIFT_FILE}: features differ from the feature spec's")
    warm_start = np.array(warm.errors, dtype=np.float64)
    return Bundle(
        root,
        manifest,
        spec,
        scaler,
        warm_start,
        drift,
        _feature_range(warm, len(spec.feature_names())),
    )


def _feature_range(warm: WarmStart, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    if warm.feature_low is None and warm.feature_high is None:
        return None
    if warm.feature_low is None or warm.feature_high is None:
        raise BundleError(f"{THRESHOLD_FILE}: feature_low and feature_high come together")
    low = np.array(warm.feature_low, dtype=np.float64)
    high = np.array(warm.feature_high, dtype=np.float64)
    for name, values in (("feature_low", low), ("feature_high", high)):
        if values.size != width:
            raise BundleError(
                f"{THRESHOLD_FILE}: {name} has {values.size} values for {width} features"
            )
        if not np.isfinite(values).all():
            raise BundleError(f"{THRESHOLD_FILE}: {name} holds a non-finite value")
    if (low > high).any():
        raise BundleError(f"{THRESHOLD_FILE}: feature_low is above feature_high")
    return low, high


def spec_difference(a: FeatureSpec, b: FeatureSpec) -> str:
    """The first field where two specs differ, columns last (they are long)."""
    da, db = msgspec.to_builtins(a), msgspec.to_builtins(b)
    keys = [k for k in FeatureSpec.__struct_fields__ if k != "columns"] + ["columns"]
    for key in keys:
        va, vb = da.get(key), db.get(key)
        if va == vb:
            continue
        if key == "columns" and isinstance(va, list) and isinstance(vb, list):
            for i, (ca, cb) in enumerate(zip(va, vb, strict=False)):
                if ca != cb:
                    return f"columns[{i}]: bundle {ca}, config {cb}"
            return f"columns: bundle has {len(va)}, config {len(vb)}"
        return f"{key}: bundle {va!r}, config {vb!r}"
    return "no field differs"


def write_manifest(root: Path, **fields: Any) -> Manifest:
    """Hash the content files in `root` and write the manifest; returns it."""
    present = CONTENT_FILES + tuple(n for n in OPTIONAL_FILES if (root / n).is_file())
    files = {name: sha256_file(root / name) for name in present}
    manifest = Manifest(
        format_version=FORMAT_VERSION, version=content_version(files), files=files, **fields
    )
    (root / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    return manifest
