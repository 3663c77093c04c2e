"""Workers per stage over a run: how the pools followed the cluster (nodes joined, lost,
drained, workers retired at the tail), kept in job.json for ``status`` and the report."""

from __future__ import annotations

import time
from typing import Callable

MAX_POINTS = 240  # a night of a flapping fleet stays a few kilobytes of job.json


class WorkersTimeline:
    """A step function: a point each time a stage's count of workers taking shards changes,
    and one at the end. Past ``MAX_POINTS`` every other point is dropped (the first and last
    stay), so its size is bounded whatever the cluster does."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.points: list[dict] = []  # {"at": seconds since the epoch, "workers": {stage: n}}

    def sample(self, workers: dict[str, int]) -> None:
        if self.points and self.points[-1]["workers"] == workers:
            return
        self.points.append({"at": round(self._clock(), 3), "workers": dict(workers)})
        if len(self.points) > MAX_POINTS:
            self.points = self.points[:-1:2] + self.points[-1:]

    def close(self) -> list[dict]:
        """The points, with the last counts again at the end of the run."""
        if self.points:
            self.points.append({"at": round(self._clock(), 3),
                                "workers": dict(self.points[-1]["workers"])})
        return self.points


def steps(points: list[dict], stage: str) -> str:
    """A stage's counts in order, without repeats: "1 → 3 → 2"."""
    counts: list[int] = []
    for point in points:
        n = point["workers"].get(stage, 0)
        if not counts or counts[-1] != n:
            counts.append(n)
    shown = counts if len(counts) <= 12 else counts[:6] + ["…"] + counts[-5:]
    return " → ".join(str(n) for n in shown)
