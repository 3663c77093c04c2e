"""The stages of a job, each one declared object: what it loads, what it fixes of each row,
what it needs of the cluster, what it stores and where, and how a row becomes its task.

A job without ``stages:`` is one stage (its ``model``, ``render`` and ``optimize`` sections,
storing ``videos/``). A multi-stage job chains stages: each stage's task is the row's task with
the stage's fixed render settings, plus the previous stage's stored artifact as its
conditioning input (an image artifact becomes the ``image``, a video the ``video``). Only that
artifact's path, kind and sha256 travel between stages; the worker of the next stage reads it
from the output, and the sha256 makes it refuse an artifact that changed in between. A text
stage (a causal LM rewriting prompts) may lead: its artifact, of kind ``text``, is not an input
of the next stage; the rewritten prompt it recorded becomes that stage's prompt. As in
cosmos-xenna's stage specs, the scheduler and the balancer read these declarations; a stage
never schedules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jobs import params as P
from jobs.config import JobConfig, ModelConfig, OptimizeConfig, ResourcesConfig, TextStageConfig
from jobs.store import layout
from rendering import storage
from rendering.contract import Artifact, MediaInput, Result, ScoringSpec, Task
from rendering.quality import GateSpec, Rule

FINAL_ARTIFACT = "video"  # the last stage's artifact: the row's video, under videos/
# The conditioning input an earlier stage's artifact becomes, by the artifact's kind.
ROLE_OF_KIND = {"image": "image", "video": "video"}
TEXT_KIND = "text"  # a text stage's artifact: the next stage takes its rewrite as the prompt


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    model: ModelConfig
    optimize: OptimizeConfig
    overrides: dict  # per-row parameters this stage fixes (its render section)
    batch_size: int  # rows of equal shape in one call of its model
    resources: ResourcesConfig  # what one worker holds, and how many workers it gets
    artifact: str  # the name of what it stores for a row, among the row's artifacts
    folder: str  # where those artifacts go under the output
    receipts_folder: str  # its receipts: rows it stored that are not yet committed
    takes: str | None  # the artifact of the stage before, handed to it (None: the first)
    output_uri: str  # the job's output, where the stage before stored what it takes
    scoring: ScoringSpec | None = None  # the last stage scores its videos (quality.clip_model)
    gate: GateSpec | None = None  # and keeps, fails or retries those under quality.min_score
    text: TextStageConfig | None = None  # a text stage: its model rewrites the row's prompt

    @property
    def final(self) -> bool:
        return self.artifact == FINAL_ARTIFACT

    def task(self, task: Task, results: list[Result]) -> Task:
        """The row's ``task`` as this stage renders it: its fixed settings applied, and what
        the stage before stored for it (``results``: the row's results so far, one a stage) as
        a conditioning input checked by its sha256; after a text stage, the prompt it wrote."""
        result = results[self.index - 1] if self.takes else None
        previous = result.artifact(self.takes) if result is not None else None
        if previous is not None and previous.kind == TEXT_KIND:
            task = replace(task, prompt=result.metrics["rewritten_prompt"])
            previous = None
        return self.task_given(task, previous)

    def size(self, task: Task) -> tuple[int | None, int | None]:
        """(height, width) this stage renders the row's ``task`` at (a text stage: none)."""
        if self.text is not None:
            return None, None
        params = {**task.params, **self.overrides}
        return params["height"], params["width"]

    def task_given(self, task: Task, previous: Artifact | None) -> Task:
        """The row's ``task`` with this stage's settings and ``previous`` as its input."""
        if not self.overrides and previous is None:
            return task
        params = {**task.params, **self.overrides}
        inputs = dict(task.inputs)
        if previous is not None:
            inputs[ROLE_OF_KIND[previous.kind]] = MediaInput(
                uri=storage.join(self.output_uri, previous.path), sha256=previous.sha256)
        return Task(id=task.id, key=task.key, seed=task.seed, prompt=task.prompt, params=params,
                    inputs=inputs, batch_key=P.batch_key(params))


def job_stages(cfg: JobConfig) -> list[Stage]:
    """Every stage of the job, in order; a job without ``stages:`` is a single one."""
    output = storage.absolute(cfg.output.uri)
    if cfg.stages is None:
        return [Stage(0, FINAL_ARTIFACT, cfg.model, cfg.optimize, {}, cfg.render.batch_size,
                      ResourcesConfig(cpus=cfg.cluster.cpus_per_worker,
                                      workers=cfg.cluster.num_workers),
                      FINAL_ARTIFACT, layout.VIDEOS_DIR, layout.RECEIPTS_DIR, None, output,
                      _scoring(cfg, cfg.model), _gate(cfg))]
    last = len(cfg.stages) - 1
    stages = []
    for i, s in enumerate(cfg.stages):
        final = i == last
        stages.append(Stage(
            i, s.name, s.model, s.optimize or cfg.optimize, s.render.overrides(),
            s.text.batch_size if s.text else s.render.batch_size or cfg.render.batch_size,
            s.resources,
            FINAL_ARTIFACT if final else s.name,
            layout.VIDEOS_DIR if final else f"{layout.STAGES_DIR}/{s.name}",
            layout.RECEIPTS_DIR if last == 0 else f"{layout.RECEIPTS_DIR}/{s.name}",
            stages[-1].artifact if stages else None, output,
            _scoring(cfg, s.model) if final else None, _gate(cfg) if final else None, s.text))
    return stages


def stage_media_root(output_uri: str) -> str:
    """Where later stages read earlier stages' artifacts from: a media root of their workers."""
    return storage.join(storage.absolute(output_uri), layout.STAGES_DIR)


def _scoring(cfg: JobConfig, model: ModelConfig) -> ScoringSpec | None:
    q = cfg.quality
    if q.clip_model is None:
        return None
    return ScoringSpec(q.clip_model, q.revision, q.drift_threshold, dtype=model.dtype,
                       aesthetic_model=q.aesthetic_model, aesthetic_revision=q.aesthetic_revision,
                       static_threshold=q.static_threshold)


def _gate(cfg: JobConfig) -> GateSpec | None:
    """quality.min_score (the rule clip_score >= min_score) and quality.rules, in that order."""
    q = cfg.quality
    rules = [Rule("clip_score", q.min_score, None, q.on_fail, "quality.min_score")] \
        if q.min_score is not None else []
    rules += [Rule(r.column, r.min, r.max, r.on_fail, f"quality.rules[{i}]")
              for i, r in enumerate(q.rules)]
    return GateSpec(tuple(rules), q.max_tries) if rules else None
