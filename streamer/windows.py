"""Per-entity windows of the last `length` feature rows, the input of lstm and dense_window models.

Training (`sliding_windows` over the whole history) and the daemon (one `WindowBuilder.add`
per batch) build windows with this one function, so a model is served the windows it was
trained on: a row completes a window once its entity has `length` rows, and the window is
that entity's last `length` rows ending with it. Chunked `add` calls give exactly the windows
of one call over the concatenated rows (tests/unit/test_windows.py).

Each entity owns one ring of `length` rows in a shared float32 store, so memory is about
`length * n_features * 4` bytes per entity (960 B for 30 x 8) plus ~200 B of key bookkeeping;
the store grows by doubling up to `max_entities`. Beyond that the least recently updated
entity is evicted (counted in `evictions["capacity"]`) and starts over if it comes back.

`n_features` may be 0: `add` then says only which rows complete a window, at no cost.

>>> import numpy as np
>>> rows = np.arange(10, dtype=np.float32).reshape(5, 2)
>>> windows, completed = sliding_windows(["a", "b", "a", "a", "b"], rows, 2)
>>> completed.tolist()
[2, 3, 4]
>>> windows[0].tolist()   # entity "a": rows 0 and 2
[[0.0, 1.0], [4.0, 5.0]]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np


class WindowBuilder:
    """Ring buffers of each entity's last `length` rows; `add` returns the windows completed.

    Per row, Python does only the key lookup and a count; writing the rings and gathering
    the windows are a few vectorised numpy calls per batch.
    """

    def __init__(self, length: int, n_features: int, max_entities: int = 100_000) -> None:
        if length < 1 or n_features < 0 or max_entities < 1:
            raise ValueError("window length and max_entities must be >= 1, n_features >= 0")
        self.length = length
        self.n_features = n_features
        self.max_entities = max_entities
        self._evicted = 0
        self.clear()

    def clear(self) -> None:
        """Forget every entity (evictions stay counted: they are running totals)."""
        # key -> slot in the store, least recently updated first.
        self._slots: OrderedDict[Hashable, int] = OrderedDict()
        self._counts: list[int] = []  # rows seen per slot since its entity took it
        self._chunk_of: list[int] = []  # per slot: the last chunk that touched it
        self._chunk = 0
        self._store = np.zeros((0, self.length, self.n_features), dtype=np.float32)

    @property
    def entities(self) -> int:
        return len(self._slots)

    @property
    def evictions(self) -> dict[str, int]:
        """Entities evicted since start, by reason."""
        return {"capacity": self._evicted}

    def add(self, keys: Sequence[Hashable], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append `rows` (n, d) in order; return (windows (m, length, d), completed (m,)).

        `completed` holds the indices into `rows`, increasing, of the rows whose entity now
        has at least `length` rows; `windows[j]` ends with row `completed[j]`.
        """
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features or rows.shape[0] != len(keys):
            raise ValueError(
                f"rows {rows.shape} do not fit {len(keys)} keys of {self.n_features} features"
            )
        slots_of, counts, chunk_of = self._slots, self._counts, self._chunk_of
        slot_list: list[int] = []
        count_list: list[int] = []
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        for i, key in enumerate(keys):
            slot = slots_of.get(key)
            if slot is not None:
                slots_of.move_to_end(key)
            elif len(slots_of) < self.max_entities:
                slot = len(counts)
                counts.append(0)
                chunk_of.append(-1)
                slots_of[key] = slot
            else:
                _, slot = slots_of.popitem(last=False)
                self._evicted += 1
                if chunk_of[slot] == self._chunk:
                    # The slot changes entity inside this batch: finish the rows before it
                    # first, so the vectorised gather never mixes two entities in one ring.
                    parts.append(self._flush(rows[start:i], start, slot_list, count_list))
                    start, slot_list, count_list = i, [], []
                counts[slot] = 0
                slots_of[key] = slot
            counts[slot] += 1
            chunk_of[slot] = self._chunk
            slot_list.append(slot)
            count_list.append(counts[slot])
        parts.append(self._flush(rows[start:], start, slot_list, count_list))
        if len(parts) == 1:
            return parts[0]
        return (
            np.concatenate([w for w, _ in parts]),
            np.concatenate([c for _, c in parts]),
        )

    def _flush(
        self, rows: np.ndarray, offset: int, slot_list: list[int], count_list: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The windows `rows` complete: a chunk of the batch, from row `offset` on, in which
        no slot changes entity."""
        self._chunk += 1
        length, d = self.length, self.n_features
        n = len(slot_list)
        if n == 0:
            return np.empty((0, length, d), np.float32), np.empty(0, np.intp)
        slots = np.array(slot_list, dtype=np.intp)
        counts = np.array(count_list, dtype=np.intp)  # the entity's rows after each row
        self._reserve(int(slots.max()) + 1)

        # Group the chunk's rows by entity, in time order within each group.
        order = np.argsort(slots, kind="stable")
        grouped = slots[order]
        first = np.ones(n, dtype=bool)
        first[1:] = grouped[1:] != grouped[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.empty(n, dtype=np.intp)
        rank[order] = np.arange(n) - group_start  # a row's place among its entity's rows
        start_of = np.empty(n, dtype=np.intp)
        start_of[order] = group_start
        before = counts - rank - 1  # the entity's rows before this chunk (in its ring)

        completed = np.flatnonzero(counts >= length)
        if completed.size:
            # Window of row i: its entity's rows number counts[i] - length + 1 ... counts[i]
            # (1-based); those after `before` are in this chunk, the others in its ring.
            # One integer gather from [chunk rows; rings of the chunk's entities] (a boolean
            # mask assignment would be ~10x slower).
            group = np.empty(n, dtype=np.intp)
            group[order] = np.cumsum(first) - 1
            entities = grouped[first]
            rings = self._store[entities].reshape(entities.size * length, d)
            number = counts[completed, None] + np.arange(1 - length, 1)
            past = before[completed, None]
            index = np.where(
                number > past,
                order[np.clip(start_of[completed, None] + number - past - 1, 0, n - 1)],
                n + group[completed, None] * length + (number - 1) % length,
            )
            windows = np.concatenate([rows, rings])[index]
        else:
            windows = np.empty((0, length, d), dtype=np.float32)

        # Keep each entity's last `length` rows of the chunk: no ring cell written twice.
        last = np.ones(n, dtype=bool)
        last[:-1] = grouped[1:] != grouped[:-1]
        group_end = np.minimum.accumulate(np.where(last, np.arange(n), n)[::-1])[::-1]
        end_of = np.empty(n, dtype=np.intp)
        end_of[order] = group_end
        keep = (end_of - start_of) - rank < length
        # One row per ring cell (explicit shapes: reshape(-1, 0) is ambiguous when d = 0).
        flat = self._store.reshape(self._store.shape[0] * length, d)
        flat[slots[keep] * length + (counts[keep] - 1) % length] = rows[keep]
        completed += offset
        return windows, completed

    def _reserve(self, n_slots: int) -> None:
        have = self._store.shape[0]
        if n_slots <= have:
            return
        grown = min(self.max_entities, max(n_slots, 2 * have, 16))
        store = np.zeros((grown, self.length, self.n_features), dtype=np.float32)
        store[:have] = self._store
        self._store = store


def sliding_windows(
    keys: Sequence[Hashable], rows: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every window of `rows` (n, d), in one call with no entity cap: the training-time call."""
    rows = np.asarray(rows, dtype=np.float32)
    builder = WindowBuilder(length, rows.shape[1], max_entities=max(1, len(keys)))
    return builder.add(keys, rows)
