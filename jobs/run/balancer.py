"""How workers are split between stages, and when they are moved.

A stage's throughput is its workers divided by its seconds per row, and a job goes as fast as
its slowest stage. The split gives every stage one worker (or its fixed ``workers``, or the
``min`` of its range), then adds workers one at a time to the slowest stage, up to the ``max``
of its range, while the cluster has room for one more of its workers (``resources.gpus`` each on a GPU cluster, ``resources.cpus`` on a CPU one). Until
rows are measured, a stage's ``weight`` stands in for its seconds per row.

Rebalancing (``cluster.balance: auto``): once every stage has made two rows per worker, and then
at most every ``cluster.rebalance_every_s``, the split is worked out again from the measured
seconds per row (worker time per row: render, encode, upload). Workers move only when the
slowest stage would go at least ``MIN_GAIN`` faster. A move retires a worker of a stage that has
too many (it finishes the shards it holds, then stops) and starts one for the stage that has
too few, which loads that stage's model first: a move costs one model load and the drain.

Following the cluster: every ``LOOK_EVERY_S`` the balancer reads what the cluster holds; when a
node has joined or left, the split is worked out again at once for the new capacity (from the
measured seconds per row, or the weights before), so the stages grow onto a joined node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

MIN_GAIN = 1.15  # the slowest stage must speed up by this factor for workers to move
WARMUP_ROWS_PER_WORKER = 2
LOOK_EVERY_S = 2.0  # how often the cluster's capacity is read, when followed


class NotEnoughResources(ValueError):
    """The cluster cannot hold one worker of every stage."""


@dataclass(frozen=True)
class StageNeed:
    name: str
    cost: float  # resource units one worker holds: GPUs, or CPUs on a CPU cluster
    fixed: int | None  # resources.workers: never rebalanced
    weight: float
    least: int = 1  # resources.workers {min, max}: the range it is balanced within
    most: int | None = None


def split(capacity: float, needs: list[StageNeed], seconds_per_row: list[float] | None = None,
          max_workers: int | None = None, unit: str = "GPUs") -> list[int]:
    """Workers per stage that make the slowest stage as fast as ``capacity`` allows."""
    cost = [n.cost for n in needs]
    seconds = seconds_per_row or [n.weight for n in needs]
    workers = [n.fixed or n.least for n in needs]
    used = sum(w * c for w, c in zip(workers, cost))
    if used > capacity + 1e-9:
        wanted = ", ".join(f"{n.name} {w} x {c:g}" for n, w, c in zip(needs, workers, cost))
        raise NotEnoughResources(f"the stages need {used:g} {unit} ({wanted}) and the "
                                 f"cluster has {capacity:g}: lower resources.gpus/cpus or "
                                 f"resources.workers, or add nodes")
    while max_workers is None or sum(workers) < max_workers:
        slowest = min(range(len(needs)), key=lambda i: workers[i] / seconds[i])
        need = needs[slowest]
        if need.fixed is not None or (need.most is not None and workers[slowest] >= need.most) \
                or used + cost[slowest] > capacity + 1e-9:
            break  # more workers anywhere else would only wait for the slowest stage
        workers[slowest] += 1
        used += cost[slowest]
    return workers


def throughput(workers: list[int], seconds_per_row: list[float]) -> float:
    """Rows per second of the whole flow: its slowest stage's."""
    return min(w / s for w, s in zip(workers, seconds_per_row))


class Balancer:
    """Moves workers between the scheduler's stages as their measured speeds ask."""

    def __init__(self, capacity: float, needs: list[StageNeed], every_s: float,
                 max_workers: int | None = None, unit: str = "GPUs", clock=time.monotonic,
                 follow: Callable[[], float] | None = None):
        self.capacity = capacity
        self._follow = follow  # what the cluster holds now, in ``unit`` (None: a fixed cluster)
        self._next_look = 0.0
        self.unit = unit
        self.needs = needs
        self.every_s = every_s
        self.max_workers = max_workers
        self.moves = 0  # workers moved so far (each one a model load)
        self._clock = clock
        self._last: float | None = None  # when the split was last reconsidered

    def initial(self) -> list[int]:
        return split(self.capacity, self.needs, max_workers=self.max_workers, unit=self.unit)

    def consider(self, stages) -> None:
        """Resize the stages' pools if the cluster's capacity changed or the measured speeds
        call for it (see the module doc)."""
        if self._follow is not None and self._follow_cluster(stages):
            return
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s:
            return
        current = [s.pool.num_workers for s in stages]
        if any(s.ok < WARMUP_ROWS_PER_WORKER * w or s.seconds <= 0
               for s, w in zip(stages, current)):
            return
        self._last = now
        seconds = [s.seconds / s.ok for s in stages]
        target = split(self.capacity, self.needs, seconds, self.max_workers, self.unit)
        if throughput(target, seconds) < MIN_GAIN * throughput(current, seconds):
            return
        self.moves += sum(max(0, t - c) for t, c in zip(target, current))
        logger.info("rebalancing workers from %s to %s (seconds per row: %s)",
                    _split_text(stages, current), _split_text(stages, target),
                    ", ".join(f"{s:.2f}" for s in seconds))
        _resize(stages, target)

    def _follow_cluster(self, stages) -> bool:
        """Split the cluster again at once when its capacity changed; whether it did."""
        now = self._clock()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY_S
        capacity = self._follow()
        if capacity == self.capacity:
            return False
        measured = all(s.ok > 0 and s.seconds > 0 for s in stages)
        seconds = [s.seconds / s.ok for s in stages] if measured else None
        try:
            target = split(capacity, self.needs, seconds, self.max_workers, self.unit)
        except NotEnoughResources:
            return False  # less than a worker a stage: the pools wait for capacity to return
        logger.info("the cluster now holds %g %s (it held %g): workers from %s to %s", capacity,
                    self.unit, self.capacity, _split_text(stages, [s.pool.num_workers
                                                                   for s in stages]),
                    _split_text(stages, target))
        self.capacity = capacity
        _resize(stages, target)
        return True


def _resize(stages, target: list[int]) -> None:
    for stage, workers in sorted(zip(stages, target), key=lambda p: p[1] - p[0].pool.num_workers):
        if workers != stage.pool.num_workers:
            stage.pool.resize(workers)  # shrinking ones first: they free what the others need


def _split_text(stages, workers: list[int]) -> str:
    return ", ".join(f"{s.spec.name} {w}" for s, w in zip(stages, workers))
