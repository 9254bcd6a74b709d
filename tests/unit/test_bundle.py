import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamer import bundle as bundles
from streamer.profiles import ORDERS, SENSORS


def copy_bundle(src: bundles.Bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src.path, dst)
    return dst


def test_registry_current_and_contents(orders_registry: Path) -> None:
    b = bundles.load(orders_registry, expected_spec=ORDERS)
    assert b.path.parent == orders_registry
    assert (orders_registry / "current").read_text().strip() == b.version
    assert b.kind == "dense"
    assert b.manifest.feature_names == ORDERS.feature_names()
    assert b.manifest.data["events"] == 20_000
    assert b.manifest.training["epochs_run"] >= 1
    assert b.warm_start.size == 3000  # the 15% held out, in event order
    assert np.all(b.warm_start >= 0)
    assert set(b.manifest.files) == {*bundles.CONTENT_FILES, *bundles.OPTIONAL_FILES}


def test_tampered_file_is_refused(orders_bundle: bundles.Bundle, tmp_path: Path) -> None:
    path = copy_bundle(orders_bundle, tmp_path)
    scaler = path / bundles.SCALER_FILE
    scaler.write_bytes(scaler.read_bytes().replace(b'"mean"', b'"mean" ', 1))
    with pytest.raises(bundles.BundleError, match=r"scaler\.json: sha256 does not match"):
        bundles.load(path)


def test_spec_mismatch_is_refused(orders_bundle: bundles.Bundle) -> None:
    expected = r"differs from the configured one \(profile: bundle 'orders', config 'sensors'\)"
    with pytest.raises(bundles.BundleError, match=expected):
        bundles.load(orders_bundle.path, expected_spec=SENSORS)


def test_missing_and_malformed_manifest(orders_bundle: bundles.Bundle, tmp_path: Path) -> None:
    with pytest.raises(bundles.BundleError, match="not a model bundle"):
        bundles.load(tmp_path)
    path = copy_bundle(orders_bundle, tmp_path)
    (path / bundles.MODEL_FILE).unlink()
    with pytest.raises(bundles.BundleError, match=r"model\.keras: missing"):
        bundles.load(path)
    manifest = msgspec.json.decode((path / bundles.MANIFEST_FILE).read_bytes())
    manifest["version"] = "0" * 16
    (path / bundles.MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    shutil.copy(orders_bundle.path / bundles.MODEL_FILE, path / bundles.MODEL_FILE)
    with pytest.raises(bundles.BundleError, match="version does not match"):
        bundles.load(path)


def test_model_is_loaded_in_safe_mode(orders_bundle: bundles.Bundle) -> None:
    scorer = orders_bundle.load_scorer()
    x = np.zeros((3, len(ORDERS.feature_names())), dtype=np.float32)
    assert scorer.reconstruct(x).shape == x.shape
