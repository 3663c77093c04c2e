"""The scheduler: keeps workers fed with shards, retries what failed, commits what is final.

It talks to workers only through the small ``Pool`` protocol (Ray actors, the in-process
inline pool, or a test's fake), so its retry and commit policy is tested without a cluster.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cluster.protocol import Pool
from jobs import manifest
from jobs.plan import PlannedRow
from jobs.progress import Progress
from jobs.receipts import Receipts
from rendering import storage
from rendering.contract import Result

WAIT_SLICE_S = 5.0  # how long one wait for results may block before progress is reported


@dataclass
class Shard:
    rows: list[PlannedRow]  # rows to render (their outcome is a Task)
    records: list[dict] = field(default_factory=list)  # rows already final (invalid rows)


class Scheduler:
    """Submits shards to a pool started on first need, and commits each row exactly once."""

    def __init__(self, start_pool: Callable[[], Pool], output_uri: str, progress: Progress,
                 receipts: Receipts, max_attempts: int, shard_size: int, shards_per_worker: int,
                 on_commit: Callable[[list[dict]], None] | None = None):
        self._start_pool = start_pool
        self._on_commit = on_commit  # products built from committed rows (WebDataset shards)
        self.output_uri = output_uri
        self.progress = progress
        self.receipts = receipts
        self.max_attempts = max_attempts
        self.shard_size = shard_size
        self.shards_per_worker = shards_per_worker
        self.pool: Pool | None = None
        self.startup_s = 0.0  # starting the workers and loading the model
        self.rendering_since: float | None = None
        self.rendering_s = 0.0  # from the workers being ready to the last commit
        self.rendered = 0
        self._retries: deque[Shard] = deque()
        self._inflight: dict[int, Shard] = {}
        self._tokens = itertools.count()

    def run(self, shards: Iterator[Shard]) -> None:
        source_done = False
        while True:
            # Fill every worker's queue: retries first, then new shards from the input.
            while True:
                if self._retries:
                    shard = self._retries.popleft()
                elif not source_done:
                    shard = next(shards, None)
                    if shard is None:
                        source_done = True
                        continue
                else:
                    break
                if self.receipts:
                    shard = self._recover(shard)
                if not shard.rows:
                    self._commit(shard.records)
                    continue
                if not self._submit(shard):
                    self._retries.appendleft(shard)
                    break
            if not self._inflight:
                if source_done and not self._retries:
                    if self.rendering_since is not None:
                        self.rendering_s = time.monotonic() - self.rendering_since
                    return
                continue
            for outcome in self.pool.wait(WAIT_SLICE_S):
                self._settle(self._inflight.pop(outcome.token), outcome.results, outcome.error)

    @property
    def workers_replaced(self) -> int:
        return self.pool.replaced if self.pool is not None else 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _recover(self, shard: Shard) -> Shard:
        """Take out the rows whose outputs an interrupted run already stored."""
        left = []
        for row in shard.rows:
            result = self.receipts.recover(row.outcome)
            if result is None:
                left.append(row)
            else:
                row.attempts += 1
                shard.records.append(manifest.record(row, result, row.attempts))
        return Shard(left, shard.records)

    def _submit(self, shard: Shard) -> bool:
        if self.pool is None:
            started = time.monotonic()
            self.pool = self._start_pool()
            self.rendering_since = time.monotonic()
            self.startup_s = self.rendering_since - started
            self.progress.rendering_started()
        token = next(self._tokens)
        tasks = [row.outcome for row in shard.rows]
        if not self.pool.submit(token, tasks, self.shards_per_worker):
            return False
        self._inflight[token] = shard
        return True

    def _settle(self, shard: Shard, results: list[Result] | None, error: str | None) -> None:
        """Record each row's attempt; commit what is final and queue retries."""
        records = list(shard.records)
        retry: list[PlannedRow] = []
        for i, row in enumerate(shard.rows):
            row.attempts += 1
            result = results[i] if results is not None else Result.failure(
                row.id, "worker_lost", error or "worker lost", retryable=True)
            if not result.ok and result.retryable and row.attempts < self.max_attempts:
                retry.append(row)
            else:
                records.append(manifest.record(row, result, row.attempts))
                self.rendered += result.ok
        self._commit(records)
        if retry:
            # After a lost worker, retry rows one per shard: a row that kills its worker every
            # time then takes only itself down.
            size = 1 if results is None else self.shard_size
            for i in range(0, len(retry), size):
                self._retries.append(Shard(retry[i:i + size]))

    def _commit(self, records: list[dict]) -> None:
        """Write the shard's manifest (the commit), then drop the receipts it makes redundant."""
        if not records:
            return
        storage.with_retries("commit of a shard manifest", manifest.write_shard,
                             self.output_uri, records)
        self.receipts.remove([r["key"] for r in records if r["status"] == "ok"])
        if self._on_commit is not None:
            self._on_commit(records)
        ok = sum(r["status"] == "ok" for r in records)
        self.progress.advance(ok, len(records) - ok)
