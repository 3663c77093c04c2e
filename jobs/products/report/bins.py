"""A histogram of unknown range in bounded memory: the report's throughput and score plots.

The page must stay small at any size, so the manifests are binned a shard at a time and bins
widen as the range grows; each width is a multiple of the last, so merged counts stay exact.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

# Throughput bin widths: round spans of time, each a multiple of the last (then doubling).
_TIME_WIDTHS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400, 604800,
                  2419200, 31449600)


class Bins:
    """A histogram of unknown range, filled a batch at a time, in bounded memory.

    Bin ``k`` holds values in ``[k * width, (k + 1) * width)``. When the occupied keys span
    more than ``max_bins``, the width steps up to the next one (a multiple of the last) and
    keys merge by integer division, so the result does not depend on how values were batched.
    """

    def __init__(self, widths, max_bins: int):
        self._widths = iter(widths)
        self.width = next(self._widths)
        self.max_bins = max_bins
        self.counts: Counter = Counter()

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            return
        keys, counts = np.unique(np.floor(values / self.width).astype(np.int64),
                                 return_counts=True)
        self.counts.update(dict(zip(keys.tolist(), counts.tolist())))
        while max(self.counts) - min(self.counts) + 1 > self.max_bins:
            wider = next(self._widths)
            factor = round(wider / self.width)
            merged: Counter = Counter()
            for key, count in self.counts.items():
                merged[key // factor] += count
            self.counts, self.width = merged, wider

    def dense(self) -> list[tuple[float, int]]:
        """(left edge, count) of every bin from the first occupied to the last."""
        if not self.counts:
            return []
        return [(k * self.width, self.counts.get(k, 0))
                for k in range(min(self.counts), max(self.counts) + 1)]


def score_widths():
    """1e-4, 2e-4, 1e-3, 2e-3, ...: each width a multiple of the last (x2, then x5)."""
    for exponent in itertools.count(-4):
        yield 10.0 ** exponent
        yield 2 * 10.0 ** exponent


def time_widths():
    yield from _TIME_WIDTHS_S
    width = _TIME_WIDTHS_S[-1]
    while True:
        width *= 2
        yield width
