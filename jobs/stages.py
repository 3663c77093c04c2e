"""The stages of a job, resolved: what each one loads, fixes, stores and hands to the next.

A job without ``stages:`` is one stage (its ``model``, ``render`` and ``optimize`` sections,
storing ``videos/``). A multi-stage job chains stages: each stage's task is the row's task with
the stage's fixed render settings, plus the previous stage's stored artifact as its
conditioning input (a keyframe PNG becomes the ``image``, a clip the ``video``). Only that
artifact's path and sha256 travel between stages; the worker of the next stage reads it from
the output, and the sha256 makes it refuse a keyframe that changed in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.store import layout
from jobs import params as P
from jobs.config import JobConfig, ModelConfig, OptimizeConfig, ResourcesConfig
from rendering import storage
from rendering.contract import Artifact, MediaInput, Task

FINAL_ARTIFACT = "video"  # the last stage's artifact: the row's video, under videos/


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    model: ModelConfig
    optimize: OptimizeConfig
    overrides: dict  # per-row parameters this stage fixes (its render section)
    batch_size: int
    resources: ResourcesConfig
    final: bool

    @property
    def artifact(self) -> str:
        """The name of what this stage stores for a row (in the manifest's artifacts)."""
        return FINAL_ARTIFACT if self.final else self.name

    @property
    def folder(self) -> str:
        """Where its artifacts go under the output."""
        return layout.VIDEOS_DIR if self.final else f"{layout.STAGES_DIR}/{self.name}"

    @property
    def receipts_folder(self) -> str:
        return layout.RECEIPTS_DIR if self.index == 0 and self.final \
            else f"{layout.RECEIPTS_DIR}/{self.name}"


def job_stages(cfg: JobConfig) -> list[Stage]:
    """Every stage of the job, in order; a job without ``stages:`` is a single one."""
    if cfg.stages is None:
        return [Stage(0, FINAL_ARTIFACT, cfg.model, cfg.optimize, {}, cfg.render.batch_size,
                      ResourcesConfig(cpus=cfg.cluster.cpus_per_worker,
                                      workers=cfg.cluster.num_workers), final=True)]
    last = len(cfg.stages) - 1
    return [Stage(i, s.name, s.model, s.optimize or cfg.optimize, s.render.overrides(),
                  s.render.batch_size or cfg.render.batch_size, s.resources, final=i == last)
            for i, s in enumerate(cfg.stages)]


def stage_task(stage: Stage, task: Task, previous: Artifact | None, output_uri: str) -> Task:
    """The row's task as ``stage`` renders it: its fixed settings applied, and the previous
    stage's artifact as a conditioning input checked by its sha256."""
    if not stage.overrides and previous is None:
        return task
    params = {**task.params, **stage.overrides}
    inputs = dict(task.inputs)
    if previous is not None:
        role = "image" if previous.path.endswith(".png") else "video"
        inputs[role] = MediaInput(uri=storage.join(storage.absolute(output_uri), previous.path),
                                  sha256=previous.sha256)
    return Task(id=task.id, key=task.key, seed=task.seed, prompt=task.prompt, params=params,
                inputs=inputs, batch_key=P.batch_key(params))


def stage_media_root(output_uri: str) -> str:
    """Where later stages read earlier stages' artifacts from: a media root of their workers."""
    return storage.join(storage.absolute(output_uri), layout.STAGES_DIR)

