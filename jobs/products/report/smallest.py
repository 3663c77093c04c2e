"""The few rows with the smallest keys over a stream of batches, in bounded memory.

The gallery's sample (the rows of smallest ``row_hash``) and each score's lowest rows are both
"the n smallest by (value, row hash)" over every shard: kept in a max-heap of n, and from each
batch only the rows that can still enter it are looked at (a partition, not a sort of the batch),
so what is kept, and the result, do not depend on how the rows were batched.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import numpy as np


class Smallest:
    """The ``size`` rows with the smallest (value, hash) seen so far; the hash breaks ties, so
    the same output always gives the same rows."""

    def __init__(self, size: int):
        self.size = size
        self._heap: list = []  # max-heap of (-value, -hash, seq, row)
        self._seq = itertools.count()

    def offer(self, hashes: np.ndarray, rows: Callable[[list[int]], list[dict]],
              values: np.ndarray | None = None) -> None:
        """Take in a batch: one uint64 hash (and, unless ordered by hash alone, one finite value)
        per row; ``rows(indices)`` makes the rows to keep, called for at most ``size`` of them."""
        if self.size <= 0 or len(hashes) == 0:
            return
        keys = np.zeros(len(hashes)) if values is None else np.asarray(values, np.float64)
        candidates = np.arange(len(hashes))
        if len(self._heap) >= self.size:  # only rows that beat the largest kept
            value, digest = -self._heap[0][0], np.uint64(-self._heap[0][1])
            candidates = np.flatnonzero((keys < value) | ((keys == value) & (hashes < digest)))
        if len(candidates) > self.size:  # the batch's smallest few, ties at the cut kept
            primary = hashes[candidates] if values is None else keys[candidates]
            cut = np.partition(primary, self.size - 1)[self.size - 1]
            candidates = candidates[primary <= cut]
        order = candidates[np.lexsort((hashes[candidates], keys[candidates]))][:self.size]
        for i, row in zip(order.tolist(), rows(order.tolist())):
            entry = (-float(keys[i]), -int(hashes[i]), next(self._seq), row)
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, entry)
            elif entry[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, entry)

    def rows(self) -> list[dict]:
        """The rows kept, smallest first."""
        return [row for *_, row in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]
