"""The scheduler: keeps every stage's workers fed with shards, retries what failed, commits
what is final.

Shards flow through the stages in order: a shard's rows that a stage made are handed, as one
shard, to the next stage; rows it failed for good are committed at once, with the name of the
stage that failed them, and go no further. A single-stage job is the degenerate case. A stage
may start a new shard only while the rows it has made and the next stage has not finished stay
under a bound, so a fast stage never runs far ahead of a slow one: driver memory and the
storage of unconsumed keyframes stay bounded, and the freed workers can be moved to the slow
stage (``jobs.run.balancer``).

It talks to workers only through the small ``Pool`` protocol (Ray actors, the in-process
inline pool, or a test's fake), so its retry and commit policy is tested without a cluster.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cluster.protocol import Pool, ShardOutcome
from jobs.run.balancer import Balancer
from jobs.store import manifest
from jobs.store.segments import Folder
from jobs.input.plan import PlannedRow
from jobs.run.metrics import JobMetrics
from jobs.run.records import kept_artifacts, record
from jobs.run.progress import Progress
from jobs.run.timeline import WorkersTimeline
from jobs.stages import Stage
from jobs.store.receipts import Receipts
from rendering import storage
from rendering.contract import Result

WAIT_SLICE_S = 5.0  # how long one wait for results may block before progress is reported
# A shard lost with its node this often is suspect itself (a row that takes its node down, by
# memory, say): from then on its losses count against its rows' attempts.
NODE_LOSSES_PER_SHARD = 10
POLL_S = 0.05  # with several stages at work, each pool is asked in turn this often
SAMPLE_EVERY_S = 5.0  # how often the live figures (metrics' gauges, status) are taken


@dataclass
class Shard:
    rows: list[PlannedRow]  # rows to render in the stage that holds the shard
    records: list[dict] = field(default_factory=list)  # rows already final (invalid rows)
    node_losses: int = 0  # times it was lost with its worker's node


@dataclass
class _StageState:
    """A stage at work: its declaration, its pool and the shards it holds."""

    spec: Stage
    receipts: Receipts  # rows it stored but that are not yet committed
    pool: Pool | None = None
    waiting: deque = field(default_factory=deque)  # shards handed over, not yet submitted
    retries: deque = field(default_factory=deque)
    inflight: dict = field(default_factory=dict)  # token -> Shard
    ok: int = 0  # rows it made in this run
    failed: int = 0
    recovered: int = 0  # rows an interrupted run had made (their receipts say)
    seconds: float = 0.0  # worker seconds of the rows it made (render, encode, upload)
    cache_hits: int = 0  # a text stage's rows whose rewrite came from its cache

    def rows_inflight(self) -> int:
        return sum(len(s.rows) for s in self.inflight.values())

    def rows_held(self) -> int:
        """Rows this stage has taken and not finished."""
        return (self.rows_inflight() + sum(len(s.rows) for s in self.waiting)
                + sum(len(s.rows) for s in self.retries))

    def idle(self) -> bool:
        return not (self.inflight or self.waiting or self.retries)


class Scheduler:
    """Submits shards to each stage's pool (all started together on first need), and commits
    each row exactly once."""

    def __init__(self, stages: list[Stage],
                 start_workers: Callable[[], tuple[list[Pool], Balancer | None]], output_uri: str,
                 progress: Progress, max_attempts: int, shard_size: int, shards_per_worker: int,
                 on_commit: Callable[[list[dict]], None] | None = None,
                 backlog_rows: int | None = None, metrics: JobMetrics | None = None,
                 on_sample: Callable[[dict], None] | None = None, folder: Folder | None = None):
        self._start_workers = start_workers  # each stage's pool, and the balancer that moves them
        self._folder = folder  # folds committed shards into segments
        self._on_commit = on_commit  # products built from committed rows (WebDataset tars)
        self.balancer: Balancer | None = None  # comes with the pools
        self.stages = [_StageState(stage, Receipts(output_uri, stage.receipts_folder,
                                                   stage.artifact)) for stage in stages]
        self.output_uri = output_uri
        self.progress = progress
        self.max_attempts = max_attempts
        self.shard_size = shard_size
        self.shards_per_worker = shards_per_worker
        self.backlog_rows = backlog_rows  # None: two rounds of shards for the next stage's workers
        self.startup_s = 0.0  # starting the workers and loading the models
        self.rendering_since: float | None = None
        self.rendering_s = 0.0  # from the workers being ready to the last commit
        self.rendered = 0
        self.recovered = 0  # rows whose every stage an interrupted run had stored
        self._tokens = itertools.count()
        self.timeline = WorkersTimeline()  # workers per stage taking shards, as they change
        self.metrics = metrics or JobMetrics("", enabled=False)
        self._on_sample = on_sample  # gets the live figures every SAMPLE_EVERY_S
        self._next_sample = 0.0
        self._gpu_peaks: dict[tuple[str, str, str], int] = {}  # (stage, ip, GPU) -> bytes

    def run(self, shards: Iterator[Shard]) -> None:
        first = self.stages[0]
        source_done = False
        while True:
            self._feed_all()
            # Read input only as fast as the first stage takes it: a shard waits at most.
            while not source_done and not first.waiting and not first.retries:
                shard = next(shards, None)
                if shard is None:
                    source_done = True
                else:
                    self._admit(shard)
                    self._feed_all()
            busy = [s for s in self.stages if s.inflight]
            if not busy:
                if source_done and all(s.idle() for s in self.stages):
                    if self.rendering_since is not None:
                        self.rendering_s = time.monotonic() - self.rendering_since
                    self.timeline.close()
                    self.sample()
                    return
                continue
            slice_s = WAIT_SLICE_S if len(busy) == 1 else POLL_S
            for stage in busy:
                for outcome in stage.pool.wait(slice_s):
                    self._settle(stage, stage.inflight.pop(outcome.token), outcome)
            for stage in self.stages:  # idle pools follow the cluster too (retire at the tail)
                if stage.pool is not None and not stage.inflight:
                    stage.pool.wait(0)
            self._tell_demand(source_done)
            self.progress.workers = {s.spec.name: s.pool.loaded()
                                     for s in self.stages if s.pool is not None}
            self.timeline.sample(self.progress.workers)
            if time.monotonic() >= self._next_sample:
                self._next_sample = time.monotonic() + SAMPLE_EVERY_S
                self.sample()
            if self.balancer is not None:
                self.balancer.consider(self.stages)

    @property
    def workers_replaced(self) -> int:
        return sum(s.pool.replaced for s in self.stages if s.pool is not None)

    def pool_events(self) -> dict[str, int]:
        """How the pools followed the cluster: workers joined, lost with their nodes, ..."""
        total: dict[str, int] = {}
        for stage in self.stages:
            for name, count in (stage.pool.events.items() if stage.pool is not None else ()):
                total[name] = total.get(name, 0) + count
        return total

    def sample(self) -> dict:
        """The live figures: per stage its workers by state, rows in flight and waiting, made,
        failed and per second, the pool's events and the GPUs its workers hold; the job's rows
        to do, committed, failed, remaining and ETA. They go to ``on_sample``."""
        stages = []
        for stage in self.stages:
            pool, name = stage.pool, stage.spec.name
            gpus = [(p["ip"], gpu, self._gpu_peaks.get((name, p["ip"], gpu)))
                    for p in (pool.placements() if pool is not None else ()) if p.get("ip")
                    for gpu in p.get("gpu_ids") or ()]
            rate = self.progress.stage_rate(name)
            stages.append({"name": name, "states": dict(pool.states()) if pool else {},
                           "inflight": stage.rows_inflight(),
                           "waiting": stage.rows_held() - stage.rows_inflight(),
                           "made": stage.ok, "failed": stage.failed,
                           "rows_per_s": round(rate, 4) if rate is not None else None,
                           "events": dict(pool.events) if pool else {}, "gpus": gpus})
        p = self.progress
        figures = {"stages": stages, "to_do": p.total, "committed": p.ok + p.failed,
                   "failed": p.failed, "remaining": max(0, p.total - p.ok - p.failed),
                   "eta_s": p.eta_s()}
        if self._on_sample is not None:
            self._on_sample(figures)
        return figures

    def _tell_demand(self, source_done: bool) -> None:
        """Tell each pool how many workers the work left could keep busy (a round of shards
        each): elastic pools grow toward it, and at the tail (nothing left for a stage to
        start) their idle workers retire so nodes can go."""
        remaining = self.progress.total - self.progress.ok - self.progress.failed
        per_worker = self.shard_size * self.shards_per_worker
        for index, stage in enumerate(self.stages):
            if stage.pool is None:
                continue
            upstream = not source_done or any(not s.idle() for s in self.stages[:index])
            starts_more = bool(stage.waiting or stage.retries) or upstream
            stage.pool.demand(max(1, -(-remaining // per_worker)) if starts_more else 0)

    def close(self) -> None:
        for stage in self.stages:
            if stage.pool is not None:
                stage.pool.shutdown()

    # --- moving shards ---------------------------------------------------------------------
    def _admit(self, shard: Shard) -> None:
        """Take a shard from the input: each row goes to the first stage an interrupted run
        did not finish for it (its receipts say), or straight to its commit."""
        by_stage: dict[int, list[PlannedRow]] = {}
        records = list(shard.records)
        for row in shard.rows:
            index = self._recover(row)
            if index == len(self.stages):
                self.recovered += 1
                records.append(record(row))
            else:
                by_stage.setdefault(index, []).append(row)
        if not by_stage:
            self._commit(records)
            return
        for position, (index, rows) in enumerate(sorted(by_stage.items())):
            self.stages[index].waiting.append(Shard(rows, records if position == 0 else []))

    def _recover(self, row: PlannedRow) -> int:
        """How many stages of ``row`` an interrupted run already stored, or the commit a repair
        replaces kept (a keyframe whose video failed): their results are added to the row."""
        kept = kept_artifacts(row.replaces, row.outcome)
        for index, stage in enumerate(self.stages):
            earlier = kept if not stage.spec.final else []  # the final artifact is redone
            if not stage.receipts and not earlier:
                return index
            task = stage.spec.task(row.outcome, row.results)
            result = stage.receipts.recover(task) or stage.receipts.recover_kept(task, earlier)
            if result is None:
                return index
            row.attempts += 1
            self._advance(stage, row, result, recovered=True)
        return len(self.stages)

    def _feed_all(self) -> None:
        """Feed the stages from the last: shards close to done go first."""
        for index in reversed(range(len(self.stages))):
            self._feed(index)

    def _feed(self, index: int) -> None:
        """Submit the stage's retries, then its waiting shards while the next stage keeps up."""
        stage = self.stages[index]
        while stage.retries or (stage.waiting and self._may_start(index)):
            queue = stage.retries if stage.retries else stage.waiting
            shard = queue.popleft()
            if not shard.rows:
                self._commit(shard.records)
                continue
            if not self._submit(stage, shard):
                queue.appendleft(shard)
                return

    def _may_start(self, index: int) -> bool:
        """Whether stage ``index`` may take a new shard: the rows it holds and the next stage
        has not finished stay under the backlog bound, by default two rounds of shards for the
        next stage's workers as it has them now (a rebalance changes it)."""
        if index + 1 == len(self.stages):
            return True
        following = self.stages[index + 1]
        workers = following.pool.num_workers if following.pool is not None else 1
        bound = self.backlog_rows or 2 * self.shards_per_worker * self.shard_size * workers
        return self.stages[index].rows_inflight() + following.rows_held() < bound

    def _submit(self, stage: _StageState, shard: Shard) -> bool:
        if stage.pool is None:
            self._start()
        token = next(self._tokens)
        tasks = [stage.spec.task(row.outcome, row.results) for row in shard.rows]
        if not stage.pool.submit(token, tasks, self.shards_per_worker):
            return False
        stage.inflight[token] = shard
        return True

    def _start(self) -> None:
        started = time.monotonic()
        pools, self.balancer = self._start_workers()
        for stage, pool in zip(self.stages, pools):
            stage.pool = pool
        self.rendering_since = time.monotonic()
        self.startup_s = self.rendering_since - started
        self.progress.rendering_started()

    def _settle(self, stage: _StageState, shard: Shard, outcome: ShardOutcome) -> None:
        """Record each row's attempt; hand on what the stage made, commit what is final, and
        queue retries. A shard lost with its worker's node is no attempt of its rows: it is
        queued again whole (up to ``NODE_LOSSES_PER_SHARD`` times)."""
        if outcome.lost_with_node and shard.node_losses < NODE_LOSSES_PER_SHARD:
            shard.node_losses += 1
            stage.retries.append(shard)
            self.metrics.retried(stage.spec.name, "lost_with_node", len(shard.rows))
            return
        self._note_peak(stage, outcome)
        results = outcome.results
        records = list(shard.records)
        retry: list[PlannedRow] = []
        onward: list[PlannedRow] = []
        final = stage is self.stages[-1]
        made = 0  # rows of this shard the run finished ok
        for i, row in enumerate(shard.rows):
            row.attempts += 1
            result = results[i] if results is not None else Result.failure(
                row.id, "worker_lost", outcome.error or "worker lost", retryable=True)
            if not result.ok and result.retryable and row.attempts < self.max_attempts:
                retry.append(row)
                self.metrics.retried(stage.spec.name, result.error_code or "unknown")
                continue
            self._advance(stage, row, result, placement=outcome.placement)
            if result.ok and not final:
                onward.append(row)
            else:
                records.append(record(row))
                made += result.ok
        if onward:
            self.stages[self.stages.index(stage) + 1].waiting.append(Shard(onward))
        self._commit(records, rendered=made)
        if retry:
            # After a lost worker, retry rows one per shard: a row that kills its worker every
            # time then takes only itself down.
            size = 1 if results is None else self.shard_size
            for i in range(0, len(retry), size):
                stage.retries.append(Shard(retry[i:i + size], node_losses=shard.node_losses))

    def _note_peak(self, stage: _StageState, outcome: ShardOutcome) -> None:
        """The CUDA memory peak the shard's worker reported, for each GPU it holds."""
        peaks = [r.metrics["gpu_memory_peak_bytes"] for r in outcome.results or ()
                 if "gpu_memory_peak_bytes" in r.metrics]
        ip = outcome.placement.get("ip")
        for gpu in outcome.placement.get("gpu_ids") or () if peaks and ip else ():
            self._gpu_peaks[(stage.spec.name, ip, gpu)] = max(peaks)

    def _advance(self, stage: _StageState, row: PlannedRow, result: Result,
                 recovered: bool = False, placement: dict | None = None) -> None:
        """Close the row's account with ``stage``: its log entry (with where it was rendered),
        its result, a fresh count of attempts for the next stage."""
        seconds = sum(result.timings_s.values())
        height, width = stage.spec.size(row.outcome)
        row.stages.append({"name": stage.spec.name, "status": "ok" if result.ok else "failed",
                           "attempts": row.attempts, "seconds": seconds, "height": height,
                           "width": width, **_where(placement)})
        row.results.append(result)
        row.attempts = 0
        if recovered:
            stage.recovered += 1
            self.metrics.recovered(stage.spec.name)
            return
        self.metrics.made(stage.spec.name, result)
        if result.ok:
            stage.ok += 1
            stage.seconds += seconds
            stage.cache_hits += bool(result.metrics.get("rewrite_cache_hit"))
        else:
            stage.failed += 1
        self.progress.stage_advance(stage.spec.name, result.ok)

    def _commit(self, records: list[dict], rendered: int = 0) -> None:
        """Write the shard's manifest (the commit), then drop the receipts it makes redundant.
        ``rendered`` of its rows were made by this run: counted once the commit has landed, so
        a run stopped mid-commit reports only what it committed."""
        if not records:
            return
        path, table = storage.with_retries("commit of a shard manifest", manifest.write_shard,
                                           self.output_uri, records)
        self.rendered += rendered
        for stage in self.stages:  # each stage's receipts of the rows it made
            stage.receipts.remove([r["key"] for r in records for s in r["stages"]
                                   if s["name"] == stage.spec.name and s["status"] == "ok"])
        if self._on_commit is not None:
            self._on_commit(records)
        self.metrics.committed(records)
        ok = sum(r["status"] == "ok" for r in records)
        self.progress.advance(ok, len(records) - ok)
        if self._folder is not None:
            self._folder.committed(path, table)


def _where(placement: dict | None) -> dict:
    """A stage entry's node_id and gpu_ids: where the row was rendered (none: recovered)."""
    placement = placement or {}
    return {"node_id": placement.get("node_id"), "gpu_ids": placement.get("gpu_ids")}
