"""Each score column's distribution over the ok rows, and its lowest rows, in bounded memory.

One path for every score the workers write (CLIP, aesthetic, motion): a histogram whose bins
widen as the range grows, the count, mean and range, and the few lowest rows, which are the
ones a curator looks at first (a prompt the video misses, an ugly or a frozen clip).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from jobs.products.report.bins import Bins, score_widths
from jobs.products.report.smallest import Smallest

# The columns shown, in page order; each is a float per row (null: not scored).
SCORE_COLUMNS = ("clip_score", "aesthetic_score", "motion_score")
LOWEST_ROWS = 8  # lowest rows listed per score
# Histograms keep at most this many bins: past it, bins widen to the next width (an exact
# multiple of the last, so merged counts stay exact).
SCORE_BINS = 50


class Distribution:
    """One score column over the ok rows, gathered a shard at a time."""

    def __init__(self, column: str):
        self.column = column
        self.bins = Bins(score_widths(), SCORE_BINS)
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.lowest = Smallest(LOWEST_ROWS)

    def add(self, values: np.ndarray, hashes: np.ndarray,
            rows: Callable[[list[int]], list[dict]]) -> None:
        """Take in a shard's values (NaN: not scored), its rows' hashes (they order ties), and
        how to make its rows by index."""
        finite = np.flatnonzero(np.isfinite(values))
        if len(finite) == 0:
            return
        scored = values[finite]
        self.bins.add(scored)
        self.count += len(scored)
        self.total += float(scored.sum())
        self.low = min(self.low, float(scored.min()))
        self.high = max(self.high, float(scored.max()))
        self.lowest.offer(hashes[finite], lambda picked: rows(finite[picked].tolist()), scored)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan
