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
from dataclasses import dataclass, replace
from typing import Iterator


from jobs.store import layout, manifest
from jobs.verify import rows_to_redo, unlisted_artifacts
from jobs.run.balancer import Balancer, StageNeed
from jobs.config import JobConfig, with_absolute_paths
from jobs.input.dataset import open_dataset
from jobs.store.lease import acquire as acquire_lease
from jobs.input.media import media_roots
from jobs.store.job_file import (OutputError, check_resumable, finish_job, read_job, start_job,
                                 unwritable)
from jobs.store.location import check_output_is_folder
from jobs.products.webdataset.packer import Packer, PackSpec
from jobs.input.plan import PlanCounts, PlannedRow, plan_rows
from jobs.run.progress import Progress
from jobs.store.receipts import Receipts
from jobs.products.report.page import write_report
from jobs.input.rows import RowFailure
from jobs.run.records import record
from jobs.run.scheduler import Lane, Scheduler, Shard
from jobs.stages import Stage, job_stages, stage_media_root, stage_task
from rendering import storage
from rendering.contract import (EncodeSpec, MediaSpec, ModelSpec, OptimizeSpec, ScoringSpec,
                                Task, WorkerSpec)
from rendering.quality import GateSpec

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
    job = read_job(cfg.output.uri)
    check_resumable(cfg, job)
    to_redo = rows_to_redo(cfg.output.uri, "failed" in redo, "damaged" in redo) if redo else {}
    if redo:
        logger.info("repairing %d committed row(s) (%s)", len(to_redo), ", ".join(sorted(redo)))
    committed = manifest.committed_hashes(cfg.output.uri, to_redo)
    job = start_job(cfg, job, dataset.num_rows)

    # Step 2: clear what an interrupted run left half-written; find what it left complete.
    fs, root = storage.filesystem(cfg.output.uri)
    stages = job_stages(cfg)
    folders = dict.fromkeys([*layout.FOLDERS, *(s.folder for s in stages),
                             *(s.receipts_folder for s in stages)])
    removed = storage.remove_temp_objects(fs, root, tuple(folders))
    if removed:
        logger.info("removed %d temporary object(s) left by an interrupted run", removed)
    lanes = [Lane(stage.name, Receipts(cfg.output.uri, stage.receipts_folder, stage.artifact),
                  _task_of(stages, stage, cfg.output.uri)) for stage in stages]

    # Step 3: stream the rows not yet committed, cut them into shards, and render them,
    # starting the cluster only if there is something to render.
    counts = PlanCounts()
    shards = _while_held(lease, _shards(plan_rows(dataset, cfg, committed, counts, redo=to_redo),
                                        cfg.output.shard_size))
    bar = Progress(max(0, dataset.num_rows - len(committed)), enabled=progress)
    packer = _packer(cfg, dataset.num_rows)
    scheduler = Scheduler(lambda: _start_pools(cfg, stages, scheduler), lanes, cfg.output.uri, bar,
                          max_attempts=cfg.cluster.max_attempts, shard_size=cfg.output.shard_size,
                          shards_per_worker=cfg.cluster.shards_in_flight_per_worker,
                          on_commit=packer.add if packer else None,
                          backlog_rows=cfg.cluster.stage_backlog_rows)
    try:
        with packer or contextlib.nullcontext():
            scheduler.run(shards)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Interrupted)
        if not lease.lost:
            _finish_quietly(cfg, job, "interrupted", dataset.num_rows, scheduler)
        raise Interrupted("stopped: committed work is kept; rerun the same command to resume") from None
    except BaseException:
        if not lease.lost:  # a run that lost the output must not write its state any more
            _finish_quietly(cfg, job, "failed", dataset.num_rows, scheduler)
        raise
    finally:
        bar.close()
        scheduler.close()

    # Step 4: consolidate the manifest, record how the run ended, and write the report.
    lease.check()
    tally = _finish(cfg, job, "finished", dataset.num_rows, scheduler)
    _write_report(cfg.output.uri)
    return RenderSummary(cfg.output.uri, dataset.num_rows, tally.ok, tally.rows - tally.ok,
                         scheduler.rendered, counts.done, scheduler.recovered,
                         scheduler.workers_replaced, time.monotonic() - started,
                         scheduler.startup_s, scheduler.rendering_s,
                         tally.rows == dataset.num_rows,
                         [(code, n) for code, n, _ in tally.top_errors()],
                         dict(tally.kept_below))


def _finish(cfg: JobConfig, job: dict, status: str, input_rows: int,
            scheduler: Scheduler) -> manifest.Tally:
    """Write manifest.parquet and job.json; mark the output complete when it is."""
    tally = manifest.consolidate(cfg.output.uri)
    complete = status == "finished" and tally.rows == input_rows
    unlisted, examples = unlisted_artifacts(cfg.output.uri) if complete else (0, [])
    complete = complete and not unlisted
    if complete:
        Receipts(cfg.output.uri).remove_all()
    _remove_probes(cfg.output.uri)
    figures = {"rendered": scheduler.rendered, "recovered": scheduler.recovered,
               "workers_replaced": scheduler.workers_replaced,
               "startup_s": round(scheduler.startup_s, 3),
               "rendering_s": round(scheduler.rendering_s, 3)}
    if len(scheduler.stages) > 1:
        figures["stages"] = _stage_figures(scheduler)
        figures["workers_moved"] = scheduler.balancer.moves if scheduler.balancer else 0
    gate = tally.gate_counts() if cfg.quality.min_score is not None else {}
    finish_job(cfg, job, status, {"rows": input_rows, "ok": tally.ok,
                                  "failed": tally.rows - tally.ok, "committed": tally.rows, **gate},
               figures, complete)
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
        out[stage.lane.name] = {
            "made": stage.ok, "failed": stage.failed, "recovered": stage.recovered,
            "seconds_per_row": round(stage.seconds / stage.ok, 4) if stage.ok else None,
            "rows_per_s": round(stage.ok / rendering_s, 4) if rendering_s > 0 else None,
            "workers": getattr(stage.pool, "num_workers", 1) if stage.pool is not None else 0}
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


def worker_spec(cfg: JobConfig, stage: Stage | None = None) -> WorkerSpec:
    """What every worker of ``stage`` (default: the last, the video stage) is built from. Only
    the last stage scores and previews; later stages may read what earlier ones stored."""
    stage = stage or job_stages(cfg)[-1]
    model, limits = stage.model, cfg.limits
    roots = media_roots(cfg) + ((stage_media_root(cfg.output.uri),) if stage.index else ())
    return WorkerSpec(
        model=ModelSpec(model.path, model.revision, model.variant, model.dtype, model.pipeline,
                        model.scheduler, tuple(sorted(model.scheduler_config.items()))),
        encode=EncodeSpec(crf=cfg.encode.crf, preset=cfg.encode.preset),
        output_uri=cfg.output.uri, artifact_dir=stage.folder, receipts_dir=stage.receipts_folder,
        probes_dir=layout.PROBES_DIR,
        artifact_name=stage.artifact, final=stage.final,
        previews_dir=layout.PREVIEWS_DIR, previews=tuple(cfg.encode.previews) if stage.final else (),
        preview_max_side=cfg.encode.preview_max_side,
        scoring=_scoring(cfg, stage) if stage.final else None,
        gate=_gate(cfg) if stage.final else None,
        batch_size=stage.batch_size,
        torch_threads=max(1, int(stage.resources.cpus)),
        optimize=OptimizeSpec(**stage.optimize.model_dump()),
        media=MediaSpec(roots=roots, resize=cfg.render.media_resize,
                        max_bytes=limits.max_media_bytes, max_pixels=limits.max_media_pixels,
                        max_video_frames=limits.max_media_frames,
                        decode_timeout_s=limits.media_decode_timeout_s))


def _task_of(stages: list[Stage], stage: Stage, output_uri: str):
    """How a planned row becomes ``stage``'s task: from the row's own task and the artifact
    the stage before stored for it."""
    def task_of(row: PlannedRow) -> Task:
        previous = None
        if stage.index:
            previous = row.results[stage.index - 1].artifact(stages[stage.index - 1].artifact)
        return stage_task(stage, row.outcome, previous, output_uri)

    return task_of


def _scoring(cfg: JobConfig, stage: Stage) -> ScoringSpec | None:
    q = cfg.quality
    if q.clip_model is None:
        return None
    return ScoringSpec(q.clip_model, q.revision, q.drift_threshold, dtype=stage.model.dtype)


def _gate(cfg: JobConfig) -> GateSpec | None:
    q = cfg.quality
    return None if q.min_score is None else GateSpec(q.min_score, q.on_fail, q.max_tries)


def _start_pools(cfg: JobConfig, stages: list[Stage], scheduler: Scheduler) -> list:
    """Start every stage's workers: Ray actors across the cluster, split between the stages
    (and a balancer to move them later), or one renderer per stage in this process."""
    specs = [worker_spec(cfg, stage) for stage in stages]
    started = time.monotonic()
    if cfg.cluster.backend == "inline":
        from cluster.inline import InlinePool

        pools = [InlinePool(spec) for spec in specs]
        start = lambda: [pool.start() for pool in pools]  # noqa: E731
    else:
        from cluster.connect import connect, default_num_workers
        from cluster.pool import WorkerPool, start_pools

        resources = connect(cfg.cluster.address)
        default_workers, use_gpu = default_num_workers(resources, cfg.cluster.cpus_per_worker)
        if len(stages) == 1:
            split = [cfg.cluster.num_workers or default_workers]
        else:
            split = _split_stages(cfg, stages, resources, use_gpu, scheduler)
        pools = [WorkerPool(replace(spec, torch_threads=None) if use_gpu else spec, workers,
                            use_gpu, stage.resources.cpus, cfg.cluster.shard_timeout_s,
                            gpus_per_worker=stage.resources.gpus)
                 for stage, spec, workers in zip(stages, specs, split)]
        start = lambda: start_pools(pools)  # noqa: E731
    for stage, pool in zip(stages, pools):
        named = f" for stage {stage.name}" if len(stages) > 1 else ""
        logger.info("starting %s worker(s)%s and loading %s", getattr(pool, "num_workers", 1),
                    named, stage.model.path)
    infos = start()
    try:
        _check_probes(cfg.output.uri, infos)
    except BaseException:
        for pool in pools:
            pool.shutdown()
        raise
    for stage, pool, info in zip(stages, pools, infos):
        nodes = {p["node_id"] for p in pool.placements()}
        named = f"{stage.name}: " if len(stages) > 1 else ""
        logger.info("%s%d worker(s) on %d node(s), device %s, pid(s) %s", named, len(info),
                    len(nodes), info[0]["device"], " ".join(str(i["pid"]) for i in info))
    logger.info("workers loaded their models in %.1f s", time.monotonic() - started)
    return pools


def _check_probes(output_uri: str, infos: list[list[dict]]) -> None:
    """Read back the object every worker stored at start: a worker that stores where this
    driver cannot read (a local path on another machine, memory://) would write a whole job
    nowhere the manifests point."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache()
    for info in (worker for pool in infos for worker in pool):
        probe = info.get("probe")  # None: a stand-in renderer (benchmarks) stores none
        if probe and not fs.exists(storage.join(root, probe)):
            raise OutputError(
                f"output {output_uri}: a worker (pid {info['pid']}) stored a test object there "
                f"that this driver cannot read back: the workers do not share this storage with "
                f"the driver. Use an object-store URI (s3://, gs://, ...) or a folder mounted at "
                f"the same path on every node")
    _remove_probes(output_uri)


def _remove_probes(output_uri: str) -> None:
    """The workers' start-up probes have been read (replacements store theirs later)."""
    fs, root = storage.filesystem(output_uri)
    storage.remove_quietly(fs, storage.join(root, layout.PROBES_DIR), recursive=True)


def _split_stages(cfg: JobConfig, stages: list[Stage], resources: dict, use_gpu: bool,
                  scheduler: Scheduler) -> list[int]:
    """Workers per stage, from the stages' resources and weights; the balancer that moves them
    later (cluster.balance: auto) is set on the scheduler."""
    balancer = _balancer(cfg, stages, resources, use_gpu)
    scheduler.balancer = balancer if cfg.cluster.balance == "auto" else None
    return balancer.initial()


def _balancer(cfg: JobConfig, stages: list[Stage], resources: dict, use_gpu: bool) -> Balancer:
    """What the stages need of the cluster: GPUs on a GPU cluster, else CPUs."""
    capacity = float(resources.get("GPU" if use_gpu else "CPU", 1))
    needs = [StageNeed(s.name, s.resources.gpus if use_gpu else s.resources.cpus,
                       s.resources.workers, s.resources.weight) for s in stages]
    return Balancer(capacity, needs, cfg.cluster.rebalance_every_s, cfg.cluster.num_workers,
                    unit="GPUs" if use_gpu else "CPUs")


def _packer(cfg: JobConfig, input_rows: int) -> Packer | None:
    """The WebDataset packer of this run, with what earlier runs committed taken in (shards
    already complete are packed at once, off the scheduling loop)."""
    if cfg.output.webdataset is None:
        return None
    packer = Packer(cfg.output.uri, PackSpec(cfg.output.webdataset.rows_per_shard,
                                             cfg.output.keep_videos), input_rows)
    packer.seed_from_output()
    return packer


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
