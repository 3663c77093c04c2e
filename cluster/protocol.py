"""What a pool of workers offers the scheduler: Ray actors, the inline pool, or a test's fake.

The scheduler decides what shards hold and when to retry; a pool only carries shards to
workers and brings back their results, or says that a shard was lost with its worker.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from rendering.contract import Result, Task


@dataclass
class ShardOutcome:
    token: Any  # what the scheduler submitted the shard with
    results: list[Result] | None  # None when the shard was lost with its worker
    error: str | None = None
    # The worker went down with its node (preempted, drained, removed): no fault of its rows,
    # whose attempts it does not spend.
    lost_with_node: bool = False
    placement: dict = field(default_factory=dict)  # where it ran: node_id, ip, gpu_ids


class Pool(Protocol):
    replaced: int  # workers replaced so far
    events: Counter  # joined, lost_with_node, drained, retired_idle: how it followed its cluster
    num_workers: int  # workers it holds now, or is growing or shrinking to (elastic: at least)
    max_workers: float  # the most it grows to while there is work (math.inf: no limit)

    def resize(self, num_workers: int) -> None:
        """Grow to ``num_workers`` (new workers load the model, then take shards) or shrink
        (retiring workers finish the shards they hold, then stop)."""

    def start(self) -> list[dict]:
        """Start the workers and load the model; what each loaded (device, load_s, ...)."""

    def placements(self) -> list[dict]:
        """Where each loaded worker runs: node_id, ip and gpu_ids."""

    def loaded(self) -> int:
        """Workers that have loaded their model (taking shards, or retiring)."""

    def states(self) -> Counter:
        """Workers by state: pending (not placed yet), loading, ready, busy, retiring."""

    def demand(self, workers: int) -> None:
        """How many workers the remaining work could keep busy: an elastic pool grows toward
        it as capacity appears; 0 at the tail, where idle workers retire."""

    def submit(self, token: Any, tasks: list[Task], max_per_worker: int) -> bool:
        """Queue a shard; False when every worker already holds ``max_per_worker``."""

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        """Shards that finished or were lost, waiting at most ``timeout_s``."""

    def shutdown(self) -> None:
        """Stop every worker."""
