"""``duplicates.parquet``: the near-duplicates ``reelfarm dedup`` found, kept while they hold.

dedup judges the rows as they are committed when it runs. Each entry names the commit of the
row and of the earlier row it duplicates (their ``committed_at``), and holds only while both
are still the current commits: a repair of either (``render --redo``, a new commit) voids it
until dedup runs again, rather than let a verdict on the old video stick to the new one.
Consolidation (``duplicate_of`` in ``manifest.parquet``), the WebDataset packer and its check
read rows in input order, the earlier row of a pair first, so ``Marks`` checks both in one
pass, holding only the entries (and a hash per row they name).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from jobs.store import layout
from jobs.store.hashset import HashSet, row_hashes
from jobs.store.parquet_files import read_parquet
from rendering import storage

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("occurrence", pa.int32()), ("row_index", pa.int64()),
                    ("committed_at", pa.float64()),  # the commit judged
                    ("duplicate_of", pa.string()), ("duplicate_of_occurrence", pa.int32()),
                    ("duplicate_of_committed_at", pa.float64()),  # the earlier row's commit
                    ("similarity", pa.float64())])


class Marks:
    """The entries of ``duplicates.parquet`` that still hold, row by row, for rows given in
    input order (``apply``)."""

    def __init__(self, table: pa.Table):
        order = np.argsort(row_hashes(table), kind="stable")
        self._table = table.take(order)
        self._keys = row_hashes(self._table)
        self._stamps = self._table["committed_at"].to_numpy(zero_copy_only=False)
        earlier = self._table.select(["duplicate_of", "duplicate_of_occurrence"]) \
            .rename_columns(["id", "occurrence"])
        self._earlier_keys = row_hashes(earlier)
        # The earlier rows as judged (one commit each), and those found current so far.
        stamps = self._table["duplicate_of_committed_at"].to_numpy(zero_copy_only=False)
        self._judged, first = np.unique(self._earlier_keys, return_index=True)
        self._judged_stamps = stamps[first]
        self._current = HashSet()

    @classmethod
    def read(cls, output_uri: str) -> "Marks | None":
        """The output's marks; None when dedup never ran, or ran before entries named their
        commits (they cannot be checked: run dedup again)."""
        fs, root = storage.filesystem(output_uri)
        try:
            table = read_parquet(fs, storage.join(root, layout.DUPLICATES_FILE))
        except FileNotFoundError:
            return None
        if not {"committed_at", "duplicate_of_committed_at"} <= set(table.column_names):
            logger.warning("%s predates checked entries: not applied (run reelfarm dedup again)",
                           layout.DUPLICATES_FILE)
            return None
        return cls(table)

    def mark(self, table: pa.Table) -> pa.Table:
        """``table`` (manifest rows: ``id``, ``occurrence``, ``committed_at``) with its
        ``duplicate_of`` and ``duplicate_similarity`` set: null unless an entry holds for the
        row. Every row before ``table``'s in input order must have been marked before."""
        for name, values in zip(("duplicate_of", "duplicate_similarity"), self._apply(table)):
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, values)
        return table

    def _apply(self, table: pa.Table) -> tuple[pa.Array, pa.Array]:
        keys = row_hashes(table)
        stamps = table["committed_at"].to_numpy(zero_copy_only=False)
        # Step 1: the earlier rows of entries, committed as they were judged.
        at = _find(self._judged, keys)
        judged = at >= 0
        judged[judged] = self._judged_stamps[at[judged]] == stamps[judged]
        self._current.add(keys[judged])
        # Step 2: the entries of these rows, as judged, whose earlier row is current.
        at = _find(self._keys, keys)
        holds = at >= 0
        holds[holds] = self._stamps[at[holds]] == stamps[holds]
        holds[holds] = self._current.contains(self._earlier_keys[at[holds]])
        rows = pa.array(at, pa.int64(), mask=~holds)
        return self._table["duplicate_of"].take(rows), self._table["similarity"].take(rows)


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each key's position in ``sorted_keys`` (its first, if repeated), or -1."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)
