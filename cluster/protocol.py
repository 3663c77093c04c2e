"""What a pool of workers offers the scheduler: Ray actors, the inline pool, or a test's fake.

The scheduler decides what shards hold and when to retry; a pool only carries shards to
workers and brings back their results, or says that a shard was lost with its worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from rendering.contract import Result, Task


@dataclass
class ShardOutcome:
    token: Any  # what the scheduler submitted the shard with
    results: list[Result] | None  # None when the shard was lost with its worker
    error: str | None = None


class Pool(Protocol):
    replaced: int  # workers replaced so far
    num_workers: int  # workers it holds now, or is growing or shrinking to

    def resize(self, num_workers: int) -> None:
        """Grow to ``num_workers`` (new workers load the model, then take shards) or shrink
        (retiring workers finish the shards they hold, then stop)."""

    def start(self) -> list[dict]:
        """Start the workers and load the model; what each loaded (device, load_s, ...)."""

    def placements(self) -> list[dict]:
        """Where each worker runs: node_id and gpu_ids."""

    def submit(self, token: Any, tasks: list[Task], max_per_worker: int) -> bool:
        """Queue a shard; False when every worker already holds ``max_per_worker``."""

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        """Shards that finished or were lost, waiting at most ``timeout_s``."""

    def shutdown(self) -> None:
        """Stop every worker."""
