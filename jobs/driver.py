"""The render driver: plan, shard, schedule, commit, report.

It streams the input, cuts rows into shards, keeps every worker fed, and commits each shard's
manifest as soon as its videos are stored. Only small metadata reaches it; it never imports
torch. A rerun of the same job skips every committed row, so a crash costs at most the work
in flight.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Iterator


from jobs.store import layout, manifest
from jobs.verify import rows_to_redo, unlisted_artifacts
from jobs.config import JobConfig, with_absolute_paths
from jobs.input.dataset import open_dataset, signature
from jobs.store.lease import acquire as acquire_lease
from jobs.store.job_file import (OutputError, check_resumable, finish_job, finished_before,
                                 read_job, start_job, unwritable)
from jobs.store.location import check_output_is_folder, remove_probes
from jobs.products.dedup import find_duplicates
from jobs.products.webdataset.packer import Packer, pack_output
from jobs.products.webdataset.tars import PackSpec
from jobs.input.plan import PlanCounts, PlannedRow, plan_rows
from jobs.run.metrics import JobMetrics
from jobs.run.workers import start_workers
from jobs.run.progress import Progress
from jobs.store.receipts import Receipts
from jobs.store.segments import Folder
from jobs.products.report.page import write_report
from jobs.input.preflight import preflight
from jobs.input.rows import RowFailure
from jobs.run.records import record
from jobs.run.scheduler import Scheduler, Shard
from jobs.stages import job_stages
from rendering import storage

logger = logging.getLogger(__name__)

class Interrupted(KeyboardInterrupt):
    """The driver was asked to stop (Ctrl-C or SIGTERM). A KeyboardInterrupt: raised by the
    signal handler wherever the driver is, it must not be taken for a storage error and retried
    by an ``except Exception``, and Ray's blocking calls pass on only a KeyboardInterrupt
    raised inside them (any other exception comes out as a SystemError)."""


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
    startup_s: float  # of ``seconds``: starting the workers and loading the model
    rendering_s: float  # of ``seconds``: from the workers being ready to the last commit
    complete: bool
    top_errors: list[tuple[str, int]]
    kept_below: dict[int, int]  # tries -> ok rows the quality gate kept below quality.min_score
    nothing_to_do: bool = False  # complete already, for this very input: nothing was read or run

    @property
    def videos_per_s(self) -> float:
        """The rendering rate, start-up left out."""
        return self.rendered / self.rendering_s if self.rendering_s > 0 else 0.0


def render(cfg: JobConfig, progress: bool = True, redo: frozenset[str] = frozenset()) -> RenderSummary:
    """Render every row not yet committed. ``redo`` repairs committed rows as well: "failed"
    ones, and "damaged" ones (ok rows whose artifacts verify finds missing or altered).

    The whole run holds the output's lease: a second driver on the same output is refused at
    once, and this one stops if it ever loses the lease (it stalled past the lease's ttl and
    another run took over)."""
    started = time.monotonic()
    with _stop_on_sigterm():
        # Step 1: check the input and the output before anything expensive starts.
        cfg = with_absolute_paths(cfg)
        check_output_is_folder(cfg.output.uri)
        dataset = open_dataset(cfg.input.uri, cfg.input.carry_columns)
        try:
            lease = acquire_lease(cfg.output.uri)
        except OSError as exc:
            raise unwritable(cfg.output.uri, exc) from exc
        try:
            return _render_holding(cfg, dataset, lease, progress, redo, started)
        finally:
            lease.release()


def _render_holding(cfg: JobConfig, dataset, lease, progress: bool, redo: frozenset[str],
                    started: float) -> RenderSummary:
    total_rows = dataset.num_rows * cfg.variations  # a text stage's variations: K rows an input row
    job = read_job(cfg.output.uri)
    check_resumable(cfg, job)
    input_signature = signature(dataset)
    if not redo and finished_before(cfg.output.uri, job, input_signature):
        return _already_complete(cfg, job, total_rows, started)
    to_redo = rows_to_redo(cfg.output.uri, "failed" in redo, "damaged" in redo) if redo else {}
    if redo:
        logger.info("repairing %d committed row(s) (%s)", len(to_redo), ", ".join(sorted(redo)))
    job = start_job(cfg, job, total_rows)
    # Shards earlier runs left (all of an output made before segments) are folded first,
    # after job.json says the output's format is the one that has segments.
    folder = Folder(cfg.output.uri, cfg.output.segment_shards, held=lease.check)
    folder.fold_listed()
    committed = manifest.committed_hashes(cfg.output.uri, to_redo)

    # Step 2: clear what an interrupted run left half-written; find what it left complete.
    fs, root = storage.filesystem(cfg.output.uri)
    stages = job_stages(cfg)
    folders = dict.fromkeys([*layout.FOLDERS, *(s.folder for s in stages),
                             *(s.receipts_folder for s in stages),
                             *(layout.REWRITE_CACHE_DIR for s in stages if s.text is not None)])
    removed = storage.remove_temp_objects(fs, root, tuple(folders))
    if removed:
        logger.info("removed %d temporary object(s) left by an interrupted run", removed)

    # Step 3: stream the rows not yet committed, cut them into shards, and render them,
    # starting the cluster only if there is something to render.
    counts = PlanCounts()
    rows = plan_rows(dataset, cfg, committed, counts, redo=to_redo, checks=preflight(cfg))
    shards = _while_held(lease, _shards(rows, cfg.output.shard_size))
    bar = Progress(max(0, total_rows - len(committed)), enabled=progress)
    packer = None if _packs_after_dedup(cfg) else _packer(cfg, total_rows)
    metrics = JobMetrics(job_name(cfg), enabled=cfg.metrics.enabled)

    def live(figures: dict) -> None:
        """The figures go to Prometheus, and with the lease's next renewal to ``status``."""
        metrics.sample(figures, lease.renewed_at)
        lease.live = figures

    scheduler = Scheduler(stages, lambda: start_workers(cfg, stages), cfg.output.uri, bar,
                          max_attempts=cfg.cluster.max_attempts, shard_size=cfg.output.shard_size,
                          shards_per_worker=cfg.cluster.shards_in_flight_per_worker,
                          on_commit=packer.add if packer else None,
                          backlog_rows=cfg.cluster.stage_backlog_rows, metrics=metrics,
                          on_sample=live, folder=folder)
    try:
        with packer or contextlib.nullcontext():
            scheduler.run(shards)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Interrupted)
        if not lease.lost:
            _finish_quietly(cfg, job, "interrupted", total_rows, scheduler)
        raise Interrupted("stopped: committed work is kept; rerun the same command to resume") from None
    except BaseException:
        if not lease.lost:  # a run that lost the output must not write its state any more
            _finish_quietly(cfg, job, "failed", total_rows, scheduler)
        raise
    finally:
        bar.close()
        scheduler.close()

    # Step 4: fold what is left once there is a segment's worth, find the near-duplicates and
    # pack the tars that leave them out, consolidate the manifest, record how the run ended,
    # and write the report.
    lease.check()
    folder.fold_listed()
    try:
        _after_last_commit(cfg, total_rows)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)
        _finish_quietly(cfg, job, "interrupted" if stopped else "failed", total_rows, scheduler)
        raise
    tally = _finish(cfg, job, "finished", total_rows, scheduler, input_signature)
    _write_report(cfg.output.uri)
    return RenderSummary(cfg.output.uri, total_rows, tally.ok, tally.rows - tally.ok,
                         scheduler.rendered, counts.done, scheduler.recovered,
                         scheduler.workers_replaced, time.monotonic() - started,
                         scheduler.startup_s, scheduler.rendering_s,
                         tally.rows == total_rows,
                         [(code, n) for code, n, _ in tally.top_errors()],
                         dict(tally.kept_below))


def job_name(cfg: JobConfig) -> str:
    """The job's name in its metrics: ``metrics.job_name``, else the output's folder name."""
    return cfg.metrics.job_name or cfg.output.uri.rstrip("/").rsplit("/", 1)[-1]


def _already_complete(cfg: JobConfig, job: dict, input_rows: int, started: float) -> RenderSummary:
    """A rerun on a complete output whose input is unchanged: the last run's counts, with
    nothing read but ``job.json`` (no manifest is consolidated, no report rewritten)."""
    counts, run = job["counts"], job["last_run"]
    logger.info("nothing to do: %s is complete and its input is unchanged since the run that "
                "finished it", cfg.output.uri)
    kept_below = {int(tries): rows for tries, rows in
                  (counts.get("kept_below_min_score_tries") or {}).items()}
    return RenderSummary(cfg.output.uri, input_rows, counts["ok"], counts["failed"], 0, input_rows,
                         0, 0, time.monotonic() - started, 0.0, 0.0, True,
                         [tuple(e) for e in run.get("top_errors", [])], kept_below,
                         nothing_to_do=True)


def _finish(cfg: JobConfig, job: dict, status: str, input_rows: int,
            scheduler: Scheduler, input_signature: str | None = None) -> manifest.Tally:
    """Write manifest.parquet and job.json; mark the output complete when it is."""
    tally = manifest.consolidate(cfg.output.uri)
    complete = status == "finished" and tally.rows == input_rows
    unlisted, examples = unlisted_artifacts(cfg.output.uri) if complete else (0, [])
    complete = complete and not unlisted
    if complete:
        Receipts(cfg.output.uri).remove_all()
    remove_probes(cfg.output.uri)
    figures = {"rendered": scheduler.rendered, "recovered": scheduler.recovered,
               "workers_replaced": scheduler.workers_replaced,
               "capacity": scheduler.pool_events(),
               "workers_over_time": scheduler.timeline.points,
               "startup_s": round(scheduler.startup_s, 3),
               "rendering_s": round(scheduler.rendering_s, 3),
               "top_errors": [[code, n] for code, n, _ in tally.top_errors()]}
    if len(scheduler.stages) > 1:
        figures["stages"] = _stage_figures(scheduler)
        figures["workers_moved"] = scheduler.balancer.moves if scheduler.balancer else 0
    gate = tally.gate_counts() if cfg.quality.min_score is not None else {}
    finish_job(cfg, job, status, {"rows": input_rows, "ok": tally.ok,
                                  "failed": tally.rows - tally.ok, "committed": tally.rows, **gate},
               figures, complete, input_signature)
    if unlisted:
        fs, root = storage.filesystem(cfg.output.uri)
        storage.remove_quietly(fs, storage.join(root, layout.SUCCESS_FILE))  # an earlier run's
        raise OutputError(f"{unlisted} committed object(s) are not in the output where its "
                          f"manifests say ({'; '.join(examples)}), so it is not marked complete: "
                          f"run reelfarm verify {cfg.output.uri}, and check that every worker "
                          f"writes to the output this driver reads")
    return tally


def _stage_figures(scheduler: Scheduler) -> dict:
    """Per stage, for job.json: rows made and failed by this run, rows recovered from an
    interrupted run, worker seconds per row and rows per second while rendering, workers."""
    out, rendering_s = {}, scheduler.rendering_s
    for stage in scheduler.stages:
        out[stage.spec.name] = {
            "made": stage.ok, "failed": stage.failed, "recovered": stage.recovered,
            "seconds_per_row": round(stage.seconds / stage.ok, 4) if stage.ok else None,
            "rows_per_s": round(stage.ok / rendering_s, 4) if rendering_s > 0 else None,
            "workers": stage.pool.num_workers if stage.pool is not None else 0,
            **({"cache_hits": stage.cache_hits} if stage.spec.text is not None else {})}
    return out


def _write_report(output_uri: str) -> None:
    """Write report.html; a report that cannot be written never fails a finished job."""
    try:
        write_report(output_uri)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not write the report (reelfarm report %s retries it): %s",
                       output_uri, exc)


def _finish_quietly(cfg: JobConfig, job: dict, status: str, input_rows: int,
                    scheduler: Scheduler) -> None:
    """Record a failed or interrupted run if storage allows; never mask the original error."""
    try:
        _finish(cfg, job, status, input_rows, scheduler)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not record the end of the run in job.json: %s", exc)


def _packer(cfg: JobConfig, input_rows: int) -> Packer | None:
    """The WebDataset packer of this run, with what earlier runs committed taken in (shards
    already complete are packed at once, off the scheduling loop)."""
    if cfg.output.webdataset is None:
        return None
    packer = Packer(cfg.output.uri, _pack_spec(cfg), input_rows)
    packer.seed_from_output()
    return packer


def _pack_spec(cfg: JobConfig) -> PackSpec:
    webdataset = cfg.output.webdataset
    return PackSpec(webdataset.rows_per_shard, cfg.output.keep_videos, webdataset.skip_duplicates)


def _packs_after_dedup(cfg: JobConfig) -> bool:
    """Tars that leave duplicates out wait for dedup: packed after the last commit."""
    return cfg.output.webdataset is not None and cfg.output.webdataset.skip_duplicates


def _after_last_commit(cfg: JobConfig, input_rows: int) -> None:
    """``quality.dedup``: find the near-duplicates among every committed row (the manifest's
    consolidation then marks them); then pack the tars that leave them out."""
    dedup = cfg.quality.dedup
    if dedup is not None:
        find_duplicates(cfg.output.uri, dedup.threshold, search=dedup.search)
    if _packs_after_dedup(cfg):
        pack_output(cfg.output.uri, _pack_spec(cfg), input_rows)


def _while_held(lease, shards: Iterator[Shard]) -> Iterator[Shard]:
    """Stop feeding shards once another run has taken the output over."""
    for shard in shards:
        lease.check()
        yield shard


def _shards(rows: Iterator[PlannedRow], shard_size: int) -> Iterator[Shard]:
    """Cut planned rows into shards of ``shard_size`` rows to render (invalid rows ride along)."""
    shard = Shard([])
    for row in rows:
        if isinstance(row.outcome, RowFailure):
            shard.records.append(record(row))
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
