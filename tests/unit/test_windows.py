from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np
import pytest

from streamer.windows import WindowBuilder, sliding_windows


def reference(
    keys: Sequence[Hashable], rows: np.ndarray, length: int, cap: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The definition, one row at a time: (windows, completed, evictions)."""
    history: OrderedDict[Hashable, list[np.ndarray]] = OrderedDict()
    windows, completed, evicted = [], [], 0
    for i, (key, row) in enumerate(zip(keys, rows, strict=True)):
        if key in history:
            history.move_to_end(key)
        else:
            history[key] = []
            if len(history) > cap:
                history.popitem(last=False)
                evicted += 1
        history[key].append(row)
        if len(history[key]) >= length:
            windows.append(np.stack(history[key][-length:]))
            completed.append(i)
    shape = (len(windows), length, rows.shape[1])
    return np.array(windows, np.float32).reshape(shape), np.array(completed, int), evicted


def interleaved(
    rng: np.random.Generator, n: int, n_entities: int, d: int
) -> tuple[list, np.ndarray]:
    keys = [f"e{k}" for k in rng.integers(0, n_entities, n)]
    return keys, rng.normal(size=(n, d)).astype(np.float32)


def add_in_chunks(
    builder: WindowBuilder, keys: list, rows: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    windows, completed, start = [], [], 0
    while start < len(keys):
        stop = start + int(rng.integers(1, 60))
        w, c = builder.add(keys[start:stop], rows[start:stop])
        assert w.dtype == np.float32 and w.shape == (len(c), builder.length, rows.shape[1])
        assert np.all(np.diff(c) > 0)
        windows.append(w)
        completed.append(c + start)
        start = stop
    return np.concatenate(windows), np.concatenate(completed)


@pytest.mark.parametrize("seed", range(5))
def test_chunked_adds_equal_one_sliding_windows_call(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys, rows = interleaved(rng, n=600, n_entities=7, d=3)
    length = int(rng.integers(2, 12))
    whole, ends = sliding_windows(keys, rows, length)
    np.testing.assert_array_equal(whole, reference(keys, rows, length, cap=10**9)[0])
    chunked, chunk_ends = add_in_chunks(WindowBuilder(length, 3), keys, rows, rng)
    np.testing.assert_array_equal(chunk_ends, ends)
    np.testing.assert_array_equal(chunked, whole)


def test_window_is_the_entity_rows_ending_with_the_completing_row() -> None:
    keys = ["a", "b"] * 4
    rows = np.arange(16, dtype=np.float32).reshape(8, 2)
    windows, completed = sliding_windows(keys, rows, 3)
    assert completed.tolist() == [4, 5, 6, 7]
    np.testing.assert_array_equal(windows[0], rows[[0, 2, 4]])
    np.testing.assert_array_equal(windows[3], rows[[3, 5, 7]])


def test_entities_with_fewer_rows_than_the_window_complete_nothing() -> None:
    builder = WindowBuilder(5, 2)
    for _ in range(4):
        windows, completed = builder.add(["a", "b", "c"], np.ones((3, 2), np.float32))
        assert windows.shape == (0, 5, 2) and completed.size == 0
    assert builder.entities == 3
    assert builder.add(["b"], np.ones((1, 2), np.float32))[1].tolist() == [0]
    empty_w, empty_c = builder.add([], np.empty((0, 2), np.float32))
    assert empty_w.shape == (0, 5, 2) and empty_c.size == 0


@pytest.mark.parametrize("cap", [1, 3, 6])
def test_capacity_is_respected_and_evictions_counted(cap: int) -> None:
    rng = np.random.default_rng(cap)
    keys, rows = interleaved(rng, n=800, n_entities=8, d=2)
    builder = WindowBuilder(4, 2, max_entities=cap)
    windows, completed = add_in_chunks(builder, keys, rows, rng)
    want_windows, want_completed, evicted = reference(keys, rows, 4, cap)
    np.testing.assert_array_equal(completed, want_completed)
    np.testing.assert_array_equal(windows, want_windows)
    assert builder.entities == cap
    assert builder.evictions == {"capacity": evicted} and evicted > 0


def test_eviction_inside_one_batch_restarts_the_entity() -> None:
    # "a" is evicted by "b" and comes back within the same add(): it starts over.
    builder = WindowBuilder(2, 1, max_entities=1)
    _, completed = builder.add(["a", "a", "b", "a", "a"], np.arange(5, dtype=np.float32)[:, None])
    assert completed.tolist() == [1, 4]
    assert builder.evictions == {"capacity": 2}


def test_clear_forgets_entities_but_keeps_counting_evictions() -> None:
    builder = WindowBuilder(2, 1, max_entities=1)
    builder.add(["a", "b"], np.zeros((2, 1), np.float32))
    builder.clear()
    assert builder.entities == 0 and builder.evictions == {"capacity": 1}
    assert builder.add(["b"], np.zeros((1, 1), np.float32))[1].size == 0  # "b" starts over


def test_zero_features_give_only_the_completed_rows() -> None:
    keys = ["a", "b", "a", "a", "b"]
    windows, completed = sliding_windows(keys, np.empty((5, 0), np.float32), 2)
    assert windows.shape == (3, 2, 0)
    assert completed.tolist() == sliding_windows(keys, np.ones((5, 1)), 2)[1].tolist()


def test_rows_must_fit_the_keys_and_features() -> None:
    builder = WindowBuilder(3, 2)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add(["a"], np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        builder.add(["a"], np.zeros((1, 3), np.float32))
