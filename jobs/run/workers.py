"""Starting a job's workers: one pool per stage, Ray actors split between the stages by what
each declares it needs (and a balancer to move them later), or one renderer per stage in this
process. The scheduler calls ``start_workers`` once, when it first has something to render."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from cluster.protocol import Pool
from jobs.config import JobConfig, WorkerRange
from jobs.input.media import media_roots
from jobs.run.balancer import Balancer, StageNeed
from jobs.stages import Stage, job_stages, stage_media_root
from jobs.store import layout
from jobs.store.location import check_probes
from rendering import storage
from rendering.contract import EncodeSpec, MediaSpec, ModelSpec, OptimizeSpec, TextSpec, WorkerSpec
from rendering.text.prompts import sha256

logger = logging.getLogger(__name__)


def worker_spec(cfg: JobConfig, stage: Stage | None = None) -> WorkerSpec:
    """What every worker of ``stage`` (default: the last, the video stage) is built from. Only
    the last stage scores and previews; every stage deals with what its pipeline's safety
    checker flags (a keyframe's too); later stages may read what earlier ones stored."""
    stage = stage or job_stages(cfg)[-1]
    model, limits = stage.model, cfg.limits
    roots = media_roots(cfg) + ((stage_media_root(cfg.output.uri),) if stage.index else ())
    return WorkerSpec(
        model=_model_spec(model), text=_text_spec(cfg, stage),
        encode=EncodeSpec(crf=cfg.encode.crf, preset=cfg.encode.preset),
        output_uri=cfg.output.uri, artifact_dir=stage.folder, receipts_dir=stage.receipts_folder,
        probes_dir=layout.PROBES_DIR,
        artifact_name=stage.artifact, final=stage.final,
        previews_dir=layout.PREVIEWS_DIR, previews=tuple(cfg.encode.previews) if stage.final else (),
        preview_max_side=cfg.encode.preview_max_side,
        scoring=stage.scoring, gate=stage.gate,
        on_unsafe=cfg.quality.on_unsafe, unsafe_max_tries=cfg.quality.max_tries,
        batch_size=stage.batch_size,
        torch_threads=max(1, int(stage.resources.cpus)),
        optimize=OptimizeSpec(**stage.optimize.model_dump()),
        media=MediaSpec(roots=roots, resize=cfg.render.media_resize,
                        max_bytes=limits.max_media_bytes, max_pixels=limits.max_media_pixels,
                        max_video_frames=limits.max_media_frames,
                        decode_timeout_s=limits.media_decode_timeout_s))


def _model_spec(model) -> ModelSpec:
    return ModelSpec(model.path, model.revision, model.variant, model.dtype, model.pipeline,
                     model.scheduler, tuple(sorted(model.scheduler_config.items())))


def _text_spec(cfg: JobConfig, stage: Stage) -> TextSpec | None:
    """A text stage's settings: its system prompt read here (the driver's file), its cache
    (under the output unless it names one), and the video model whose prompt limit it fits."""
    text = stage.text
    if text is None:
        return None
    system = text.system_prompt_text()
    cache = storage.absolute(text.cache_uri) if text.cache_uri else \
        storage.join(storage.absolute(cfg.output.uri), layout.REWRITE_CACHE_DIR)
    return TextSpec(system, sha256(system), text.max_new_tokens, text.temperature, text.top_p,
                    text.top_k, text.on_bad_rewrite, cache, _model_spec(cfg.stages[-1].model),
                    text.max_prompt_tokens, text.engine, stage.resources.gpus)


def start_workers(cfg: JobConfig, stages: list[Stage]) -> tuple[list[Pool], Balancer | None]:
    """Start every stage's pool and load its model; return the pools, in stage order, and the
    balancer that moves workers between them (``cluster.balance: auto`` with several stages
    on Ray), or None. Every worker must have proved it stores where this driver reads."""
    specs = [worker_spec(cfg, stage) for stage in stages]
    started = time.monotonic()
    balancer = None
    if cfg.cluster.backend == "inline":
        from cluster.inline import InlinePool

        pools = [InlinePool(spec) for spec in specs]
        start = lambda: [pool.start() for pool in pools]  # noqa: E731
    else:
        from cluster import capacity
        from cluster.connect import connect
        from cluster.pool import WorkerPool
        from cluster.startup import start_pools

        resources = connect(cfg.cluster.address)
        asked = cfg.cluster.gpus_per_worker
        # GPU workers on a cluster with GPUs, or whose autoscaler can launch GPU nodes.
        use_gpu = asked > 0 if asked is not None else \
            bool(resources.get("GPU")) or capacity.autoscaler_can_add("GPU")
        elastic = len(stages) == 1 and cfg.cluster.num_workers is None
        if len(stages) == 1:
            split = [cfg.cluster.num_workers or cfg.cluster.min_workers]
        else:
            balancer = _balancer(cfg, stages, resources, use_gpu)
            split = balancer.initial()
            balancer = balancer if cfg.cluster.balance == "auto" else None
        gpus = [cfg.cluster.gpus_per_worker or 1.0] if len(stages) == 1 else \
            [s.resources.gpus for s in stages]
        pools = [WorkerPool(replace(spec, torch_threads=None) if use_gpu else spec, workers,
                            use_gpu, stage.resources.cpus, cfg.cluster.shard_timeout_s,
                            gpus_per_worker=gpus_each,
                            max_workers=(cfg.cluster.max_workers or math.inf) if elastic else None,
                            capacity_timeout_s=cfg.cluster.capacity_timeout_s,
                            backups=cfg.cluster.backups)
                 for stage, spec, workers, gpus_each in zip(stages, specs, split, gpus)]
        start = lambda: start_pools(pools)  # noqa: E731
    for stage, pool in zip(stages, pools):
        named = f" for stage {stage.name}" if len(stages) > 1 else ""
        most = pool.max_workers
        count = pool.num_workers if most == pool.num_workers else \
            f"{pool.num_workers} to {most if most != math.inf else 'as many as the cluster holds'}"
        logger.info("starting %s worker(s)%s and loading %s", count, named, stage.model.path)
    infos = start()
    try:
        check_probes(cfg.output.uri, infos)
    except BaseException:
        for pool in pools:
            pool.shutdown()
        raise
    for pool in pools:  # a worker placed later proves where it stores too
        pool.on_loaded = lambda info: check_probes(cfg.output.uri, [[info]])
    for stage, pool, info in zip(stages, pools, infos):
        nodes = {p["node_id"] for p in pool.placements()}
        named = f"{stage.name}: " if len(stages) > 1 else ""
        logger.info("%s%d worker(s) on %d node(s), device %s, pid(s) %s", named, len(info),
                    len(nodes), info[0]["device"], " ".join(str(i["pid"]) for i in info))
    logger.info("workers loaded their models in %.1f s", time.monotonic() - started)
    return pools, balancer


def _balancer(cfg: JobConfig, stages: list[Stage], resources: dict, use_gpu: bool) -> Balancer:
    """What the stages need of the cluster: GPUs on a GPU cluster, else CPUs."""
    capacity = float(resources.get("GPU" if use_gpu else "CPU", 1))
    needs = []
    for s in stages:
        workers = s.resources.workers
        ranged = workers if isinstance(workers, WorkerRange) else None
        needs.append(StageNeed(s.name, s.resources.gpus if use_gpu else s.resources.cpus,
                               None if ranged else workers, s.resources.weight,
                               ranged.min if ranged else 1, ranged.max if ranged else None))
    from cluster.capacity import total

    return Balancer(capacity, needs, cfg.cluster.rebalance_every_s, cfg.cluster.num_workers,
                    follow=lambda: total("GPU" if use_gpu else "CPU"),
                    unit="GPUs" if use_gpu else "CPUs")
