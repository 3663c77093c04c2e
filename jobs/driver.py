"""The render driver: plan, shard, schedule, commit, report.

It streams the input, cuts rows into shards, keeps every worker fed, and commits each shard's
manifest as soon as its videos are stored. Only small metadata reaches it; it never imports
torch. A rerun of the same job skips every committed row, so a crash costs at most the work
in flight.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator


from jobs import manifest
from jobs.config import JobConfig
from jobs.dataset import open_dataset
from jobs.output import check_resumable, finish_job, read_job, start_job
from jobs.plan import PlanCounts, PlannedRow, plan_rows
from jobs.progress import Progress
from jobs.receipts import RECEIPTS_DIR, Receipts
from jobs.rows import RowFailure
from rendering import storage
from rendering.specs import EncodeSpec, ModelSpec, OptimizeSpec, RenderResult, WorkerSpec

logger = logging.getLogger(__name__)

WAIT_SLICE_S = 5.0  # how long one wait for results may block before progress is reported


class Interrupted(Exception):
    """The driver was asked to stop (Ctrl-C or SIGTERM)."""


@dataclass
class Shard:
    rows: list[PlannedRow]  # rows to render (their outcome is a RenderTask)
    records: list[dict] = field(default_factory=list)  # rows already final (invalid rows)


@dataclass
class RenderSummary:
    output_uri: str
    total_rows: int
    ok: int
    failed: int
    rendered: int  # videos made by this run
    skipped: int  # rows already committed before this run
    recovered: int  # rows whose video an interrupted run had stored: committed, not re-rendered
    workers_replaced: int
    seconds: float
    complete: bool
    top_errors: list[tuple[str, int]]

    @property
    def videos_per_s(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


def render(cfg: JobConfig, progress: bool = True) -> RenderSummary:
    started = time.monotonic()
    # Step 1: check the input and the output before anything expensive starts.
    dataset = open_dataset(cfg.input.uri, cfg.input.carry_columns)
    job = read_job(cfg.output.uri)
    check_resumable(cfg, job)
    committed = manifest.committed_hashes(cfg.output.uri)
    job = start_job(cfg, job, dataset.num_rows)

    # Step 2: clear what an interrupted run left half-written; find what it left complete.
    fs, root = storage.filesystem(cfg.output.uri)
    removed = storage.remove_temp_objects(fs, root)
    if removed:
        logger.info("removed %d temporary object(s) left by an interrupted run", removed)
    receipts = Receipts(cfg.output.uri)

    # Step 3: stream the rows not yet committed, cut them into shards, and render them,
    # starting the cluster only if there is something to render.
    counts = PlanCounts()
    shards = _shards(plan_rows(dataset, cfg, committed, counts), cfg.output.shard_size)
    bar = Progress(max(0, dataset.num_rows - len(committed)), enabled=progress)
    scheduler = _Scheduler(cfg, bar, receipts)
    try:
        with _stop_on_sigterm():
            scheduler.run(shards)
    except (KeyboardInterrupt, Interrupted):
        _finish_quietly(cfg, job, "interrupted", dataset.num_rows, scheduler)
        raise Interrupted("stopped: committed work is kept; rerun the same command to resume") from None
    except BaseException:
        _finish_quietly(cfg, job, "failed", dataset.num_rows, scheduler)
        raise
    finally:
        bar.close()
        scheduler.close()

    # Step 4: consolidate the manifest and record how the run ended.
    tally = _finish(cfg, job, "finished", dataset.num_rows, scheduler)
    return RenderSummary(cfg.output.uri, dataset.num_rows, tally.ok, tally.rows - tally.ok,
                         scheduler.rendered, counts.done, receipts.recovered,
                         scheduler.workers_replaced, time.monotonic() - started,
                         tally.rows == dataset.num_rows,
                         [(code, n) for code, n, _ in tally.top_errors()])


def _finish(cfg: JobConfig, job: dict, status: str, input_rows: int,
            scheduler: "_Scheduler") -> manifest.Tally:
    """Write manifest.parquet and job.json; mark the output complete when it is."""
    tally = manifest.consolidate(cfg.output.uri)
    complete = status == "finished" and tally.rows == input_rows
    if complete:
        scheduler.receipts.remove_all()
    finish_job(cfg, job, status, {"rows": input_rows, "ok": tally.ok,
                                  "failed": tally.rows - tally.ok, "committed": tally.rows},
               {"rendered": scheduler.rendered, "recovered": scheduler.receipts.recovered,
                "workers_replaced": scheduler.workers_replaced}, complete)
    return tally


def _finish_quietly(cfg: JobConfig, job: dict, status: str, input_rows: int,
                    scheduler: "_Scheduler") -> None:
    """Record a failed or interrupted run if storage allows; never mask the original error."""
    try:
        _finish(cfg, job, status, input_rows, scheduler)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not record the end of the run in job.json: %s", exc)


class _Scheduler:
    """Keeps workers fed with shards, retries what failed, commits what is final."""

    def __init__(self, cfg: JobConfig, progress: Progress, receipts: Receipts):
        self.cfg = cfg
        self.progress = progress
        self.receipts = receipts
        self.pool = None
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
        """Take out the rows whose videos an interrupted run already stored."""
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
            self.pool = _start_pool(self.cfg)
        token = next(self._tokens)
        tasks = [row.outcome for row in shard.rows]
        if not self.pool.submit(token, tasks, self.cfg.cluster.shards_in_flight_per_worker):
            return False
        self._inflight[token] = shard
        return True

    def _settle(self, shard: Shard, results: list[RenderResult] | None, error: str | None) -> None:
        """Record each row's attempt; commit what is final and queue retries."""
        records = list(shard.records)
        retry: list[PlannedRow] = []
        max_attempts = self.cfg.cluster.max_attempts
        for i, row in enumerate(shard.rows):
            row.attempts += 1
            result = results[i] if results is not None else RenderResult.failure(
                row.id, "worker_lost", error or "worker lost", retryable=True)
            if not result.ok and result.retryable and row.attempts < max_attempts:
                retry.append(row)
            else:
                records.append(manifest.record(row, result, row.attempts))
                self.rendered += result.ok
        self._commit(records)
        if retry:
            # After a lost worker, retry rows one per shard: a row that kills its worker every
            # time then takes only itself down.
            size = 1 if results is None else self.cfg.output.shard_size
            for i in range(0, len(retry), size):
                self._retries.append(Shard(retry[i:i + size]))

    def _commit(self, records: list[dict]) -> None:
        """Write the shard's manifest (the commit), then drop the receipts it makes redundant."""
        if not records:
            return
        storage.with_retries("commit of a shard manifest", manifest.write_shard,
                             self.cfg.output.uri, records)
        self.receipts.remove([r["key"] for r in records if r["status"] == "ok"])
        ok = sum(r["status"] == "ok" for r in records)
        self.progress.advance(ok, len(records) - ok)


def worker_spec(cfg: JobConfig) -> WorkerSpec:
    """What every worker of this job is built from."""
    return WorkerSpec(
        model=ModelSpec(cfg.model.path, cfg.model.revision, cfg.model.variant, cfg.model.dtype),
        encode=EncodeSpec(crf=cfg.encode.crf, preset=cfg.encode.preset),
        videos_uri=storage.join(cfg.output.uri, manifest.VIDEOS_DIR),
        receipts_uri=storage.join(cfg.output.uri, RECEIPTS_DIR),
        batch_size=cfg.render.batch_size,
        torch_threads=cfg.cluster.cpus_per_worker,
        optimize=OptimizeSpec(**cfg.optimize.model_dump()))


def _start_pool(cfg: JobConfig):
    """Start the workers: Ray actors across the cluster, or one renderer in this process."""
    spec = worker_spec(cfg)
    started = time.monotonic()
    if cfg.cluster.backend == "inline":
        from cluster.inline import InlinePool

        pool = InlinePool(spec)
    else:
        from cluster.connect import connect, default_num_workers
        from cluster.pool import WorkerPool

        resources = connect(cfg.cluster.address)
        default_workers, use_gpu = default_num_workers(resources, cfg.cluster.cpus_per_worker)
        if use_gpu:
            spec = replace(spec, torch_threads=None)
        pool = WorkerPool(spec, cfg.cluster.num_workers or default_workers, use_gpu,
                          cfg.cluster.cpus_per_worker, cfg.cluster.shard_timeout_s)
    infos = pool.start()
    nodes = {p["node_id"] for p in pool.placements()}
    logger.info("%d worker(s) on %d node(s), device %s, loaded the model in %.1f s", len(infos),
                len(nodes), infos[0]["device"], time.monotonic() - started)
    return pool


def _shards(rows: Iterator[PlannedRow], shard_size: int) -> Iterator[Shard]:
    """Cut planned rows into shards of ``shard_size`` rows to render (invalid rows ride along)."""
    shard = Shard([])
    for row in rows:
        if isinstance(row.outcome, RowFailure):
            shard.records.append(manifest.record(row, None, 0))
        else:
            shard.rows.append(row)
        if len(shard.rows) + len(shard.records) >= shard_size:
            yield shard
            shard = Shard([])
    if shard.rows or shard.records:
        yield shard


class _stop_on_sigterm:
    """Turn SIGTERM into the same clean stop as Ctrl-C, for schedulers that send it."""

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            raise Interrupted("SIGTERM")

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals to whoever owns them
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
