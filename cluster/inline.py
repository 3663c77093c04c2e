"""Run shards in the driver's own process, without Ray.

For debugging a model on one machine and for tests whose storage only exists inside one
process (``memory://``). It offers the ``Pool`` protocol, so the driver's scheduling,
retrying and committing are the same code on both backends.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from cluster.protocol import ShardOutcome
from rendering.contract import Task, WorkerSpec
from rendering.worker import ShardRenderer


class InlinePool:
    num_workers = max_workers = 1  # one renderer, in this process

    def __init__(self, spec: WorkerSpec):
        self._renderer = ShardRenderer(spec)
        self._queue: deque[tuple[Any, list[Task]]] = deque()
        self.replaced = 0
        self.events: Counter = Counter()

    def resize(self, num_workers: int) -> None:
        if num_workers != 1:
            raise ValueError("the inline backend runs one renderer per stage in the driver")

    def demand(self, workers: int) -> None:
        """One renderer, whatever the work."""

    def start(self) -> list[dict]:
        return [self._renderer.setup()]

    def placements(self) -> list[dict]:
        return [{"node_id": "driver", "gpu_ids": []}]

    def loaded(self) -> int:
        return 1

    def states(self) -> Counter:
        return Counter(busy=1) if self._queue else Counter(ready=1)

    def shutdown(self) -> None:
        self._queue.clear()

    def submit(self, token: Any, tasks: list[Task], max_per_worker: int) -> bool:
        if len(self._queue) >= max_per_worker:
            return False
        self._queue.append((token, tasks))
        return True

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        """Render the oldest queued shard now (the timeout does not apply in-process)."""
        if not self._queue:
            return []
        token, tasks = self._queue.popleft()
        return [ShardOutcome(token, self._renderer.render_shard(tasks),
                             placement={"node_id": "driver", "gpu_ids": []})]
