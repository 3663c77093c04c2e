"""Job configuration: YAML files plus ``--set key=value`` overrides, validated into typed objects.

The schema lives here; ``configs/*.yaml`` hold values only. Every problem is reported as one
line that names the key, e.g. ``render.num_frames: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from jobs import params
from jobs.params import MAX_FPS
from rendering import storage
from rendering.pipelines import adapter_named, final_stage_problem, tiny
from rendering.pipelines.schedulers import declared_scheduler_names, unknown_scheduler
from rendering.quality import ON_FAIL, RULE_COLUMNS
from rendering.text import prompts as text_prompts
from rendering.text.tiny import is_tiny_lm
# ``scheme://user[:password]@`` in a URL: credentials that must never be stored or printed.
# A password may hold '/' and '+' (AWS secret keys do), so after a ':' anything up to '@' counts.
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@\s:]+|[^/@\s:]*:[^@\s]*?)@")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(r"\1***@", text)


def _check_uri(uri: str) -> str:
    """A usable storage URI: not blank, and no credentials in it (they come from the environment)."""
    if not uri.strip():
        raise ValueError("must not be empty")
    if _URL_USERINFO.search(uri):
        raise ValueError(f"credentials in the URI are not allowed ({redact(uri)}): remove "
                         f"them and set them in the environment (e.g. AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY) or the filesystem's own config")
    return uri


def _check_finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    uri: str = Field(description="Parquet file, folder or glob, on any fsspec URL")
    carry_columns: list[str] = Field(default_factory=list,
                                     description="extra input columns copied into the manifest")
    batch_rows: int = Field(65536, ge=1, description="rows read from Parquet at a time")
    media_roots: list[str] | None = Field(
        None, description="URI prefixes a row's image/video may be read from (default: the "
                          "input dataset's folder); anything else fails its row unread")

    @field_validator("media_roots")
    @classmethod
    def _roots_are_uris(cls, value: list[str] | None) -> list[str] | None:
        for root in value or []:
            _check_uri(root)
        return value

    _uri = field_validator("uri")(_check_uri)


class ModelConfig(_Section):
    path: str = Field(description="local diffusers folder, hub id, or tiny:modelscope / tiny:wan")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    pipeline: str | None = Field(
        None, description="the diffusers pipeline class to load the weights as, e.g. "
                          "LTXImageToVideoPipeline (default: the one the model names)")
    scheduler: str | None = Field(
        None, description="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler (default: the model's own)")
    scheduler_config: dict[str, Any] = Field(
        default_factory=dict, description="overrides for the scheduler's config, e.g. {use_karras_sigmas: true}")

    @field_validator("pipeline")
    @classmethod
    def _supported_pipeline(cls, value: str | None) -> str | None:
        if value is not None:
            adapter_named(value)  # raises UnsupportedPipeline, a ValueError naming the supported
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        """An unknown class is refused here, before a cluster starts and a model loads (its
        settings are checked by the worker, before the weights load)."""
        known = declared_scheduler_names()
        problem = unknown_scheduler(value, known) if value is not None and known else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("path")
    @classmethod
    def _known_tiny(cls, value: str) -> str:
        if tiny.is_tiny(value) and not is_tiny_lm(value):  # tiny:lm: a text stage's model
            tiny.tiny_kind(value)  # raises ValueError naming the kinds there are
        return value


class RenderConfig(_Section):
    num_frames: int = Field(16, ge=1)
    height: int = Field(256, ge=8)
    width: int = Field(256, ge=8)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int = Field(0, ge=0, description="job seed; a row's seed is hashed from it and the row id")
    batch_size: int = Field(1, ge=1, description="rows of equal shape rendered in one call")
    strength: float | None = Field(
        None, ge=0, le=1, description="video-to-video: how far from the input video (default: the pipeline's own)")
    media_resize: Literal["crop", "fit", "error"] = Field(
        "crop", description="an input image/video of another size: scale and centre-crop, "
                            "scale and pad, or fail the row")

    _finite = field_validator("guidance_scale")(lambda value: _check_finite(value))


class LimitsConfig(_Section):
    """Upper bounds on per-row values, so one row cannot exhaust a GPU or run for days."""

    max_frames: int = Field(256, ge=1)
    max_height: int = Field(2048, ge=8)
    max_width: int = Field(2048, ge=8)
    max_inference_steps: int = Field(500, ge=1)
    max_prompt_chars: int = Field(20000, ge=1)
    max_id_chars: int = Field(512, ge=1)
    max_media_bytes: int = Field(256 << 20, ge=1, description="per input image or video")
    max_media_pixels: int = Field(4096 * 4096, ge=1, description="per input image or video frame (decompression bombs)")
    max_media_frames: int = Field(4096, ge=1, description="frames an input video may be asked for")
    media_decode_timeout_s: float = Field(120.0, gt=0)


class EncodeConfig(_Section):
    fps: int = Field(8, ge=1, le=MAX_FPS)
    crf: int = Field(18, ge=0, le=51, description="x264 quality: lower is better and larger")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                    "slower", "veryslow"] = "medium"
    previews: list[Literal["gif", "webp", "poster"]] = Field(
        default_factory=list, description="small previews stored beside each video: gif, webp, poster (JPEG)")
    preview_max_side: int = Field(256, ge=16, description="previews are scaled down to this longer side")


class RuleConfig(_Section):
    """One filter over a score column (see rendering.quality)."""

    column: Literal[RULE_COLUMNS] = Field(description="the score column it tests")
    min: float | None = Field(None, description="the column must be at least this")
    max: float | None = Field(None, description="the column must be at most this")
    on_fail: Literal[ON_FAIL] = Field(
        "keep", description="out of bounds: keep it (marked), fail the row, or render it again with new seeds")

    @model_validator(mode="after")
    def _bounded(self) -> "RuleConfig":
        if self.min is None and self.max is None:
            raise ValueError(f"quality rule on {self.column} needs min or max")
        return self


DEDUP_THRESHOLD = 0.95  # cosine: SemDeDup's eps = 0.05


def _switch(value):
    """A section given as ``true`` (its defaults) or ``false`` (off), or as a mapping."""
    if value is True:
        return {}
    return None if value is False else value


class DedupConfig(_Section):
    """Near-duplicates found after a run's last commit, as ``reelfarm dedup`` finds them."""

    threshold: float = Field(DEDUP_THRESHOLD, ge=-1, le=1, description="cosine similarity at or above which a row is a duplicate")
    search: Literal["exact", "buckets"] = Field(
        "exact", description="exact (quadratic), or within k-means buckets (for millions of rows; may miss a few)")


class QualityConfig(_Section):
    """CLIP scores of every rendered frame against the prompt, embeddings, aesthetic and motion
    scores, and a gate of rules on them."""

    clip_model: str | None = Field(
        None, description="a CLIP model: hub id, local folder, URL, or tiny:clip (none: no scores)")
    revision: str | None = None
    drift_threshold: float = Field(20.0, ge=0, le=100, description="a frame scoring under this (0-100) has drifted")
    min_score: float | None = Field(None, ge=0, le=100, description="the gate: a video's clip_score must reach this")
    on_fail: Literal["keep", "fail", "retry"] = Field(
        "keep", description="below min_score: keep it (marked), fail the row, or render it again with new seeds")
    max_tries: int = Field(3, ge=1, le=20, description="retry: renders per row at most; the best is kept")
    aesthetic_model: str | None = Field(
        None, description="an aesthetic MLP head over CLIP image embeddings: hub id, local folder, "
                          "URL, or tiny:aesthetic (none: no aesthetic_score)")
    aesthetic_revision: str | None = None
    static_threshold: float = Field(
        0.2, ge=0, description="mean optical flow (pixels per frame at 128 px) under which a clip is static")
    rules: list[RuleConfig] = Field(
        default_factory=list, description="more filters: {column, min and/or max, on_fail}")
    on_unsafe: Literal["keep", "fail", "retry"] = Field(
        "keep", description="a picture the pipeline's safety checker flags (and blacks out): keep "
                            "it (flagged in safety_flagged), fail the row (unsafe_content), or "
                            "render it again with new seeds, up to max_tries")
    dedup: DedupConfig | None = Field(
        None, description="find near-duplicates after the last commit: true, or {threshold, search}")

    _dedup_switch = field_validator("dedup", mode="before")(_switch)

    @model_validator(mode="after")
    def _gate_needs_scores(self) -> "QualityConfig":
        if self.min_score is not None and self.clip_model is None:
            raise ValueError("quality.min_score needs quality.clip_model to score the videos")
        if (self.rules or self.aesthetic_model or self.dedup) and self.clip_model is None:
            raise ValueError("quality.rules, quality.aesthetic_model and quality.dedup need "
                             "quality.clip_model to score the videos")
        if self.aesthetic_model is None and any(r.column == "aesthetic_score" for r in self.rules):
            raise ValueError("a quality rule on aesthetic_score needs quality.aesthetic_model")
        return self


class OptimizeConfig(_Section):
    """Speed and memory options of the pipeline. They may change pixels slightly (attention
    kernels, compilation) or visibly (caching), so they are part of the output's fingerprint."""

    attention_backend: str | None = Field(
        None, description="DiTs: diffusers attention backend: flash, _native_cudnn, sage, ... (default: torch SDPA)")
    compile: Literal["none", "repeated_blocks", "full"] = Field(
        "none", description="torch.compile the denoiser: its repeated blocks (DiTs; quick to compile) or whole")
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="CPU offload for small GPUs: whole models (some cost) or layer by layer (slow)")
    vae_slicing: bool = Field(False, description="decode one video of a batch (ModelScope: one frame) at a time (less memory)")
    vae_tiling: bool = Field(False, description="decode in overlapping tiles (less memory at large sizes; changes pixels slightly)")
    first_block_cache_threshold: float | None = Field(
        None, gt=0, description="DiTs: reuse the transformer's output while its first block barely changes")


class WebDatasetConfig(_Section):
    rows_per_shard: int = Field(1000, ge=1, description="rows of the input per tar shard (failed rows are listed, not packed)")
    skip_duplicates: bool = Field(
        False, description="leave out the rows quality.dedup marks (listed, not packed): tars are packed after it, at the end of the run")


class OutputConfig(_Section):
    uri: str = Field(description="output prefix on any fsspec URL")
    shard_size: int = Field(64, ge=1, description="rows per shard: the unit of scheduling and commit")
    segment_shards: int = Field(64, ge=1, description="committed shards folded into one manifest "
                                "segment: what is done stays a few reads at millions of rows")
    webdataset: WebDatasetConfig | None = Field(
        None, description="pack rows into WebDataset tar shards: true, or a mapping of options")
    keep_videos: bool = Field(True, description="false: drop the loose videos once packed into shards")

    _webdataset_switch = field_validator("webdataset", mode="before")(_switch)

    @model_validator(mode="after")
    def _packing_before_dropping(self) -> "OutputConfig":
        if not self.keep_videos and self.webdataset is None:
            raise ValueError("output.keep_videos: false drops videos once they are packed, so it "
                             "needs output.webdataset")
        return self

    _uri = field_validator("uri")(_check_uri)


class WorkerRange(_Section):
    """A stage's workers as a range: the balancer splits the cluster between the stages within it."""

    min: int = Field(1, ge=1, description="workers the stage keeps at least")
    max: int | None = Field(None, ge=1, description="the most it grows to (none: no limit)")

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


# A count or a {min, max} range: one error names what is wrong with either, not both readings.
_Workers = Annotated[Annotated[Annotated[int, Field(ge=1)], Tag("count")]
                     | Annotated[WorkerRange, Tag("range")],
                     Discriminator(lambda v: "range" if isinstance(v, (dict, WorkerRange)) else "count")]


class ResourcesConfig(_Section):
    """What one worker of a stage holds, and how many workers the stage gets."""

    gpus: float = Field(1.0, gt=0, le=64, description="GPUs per worker on a GPU cluster; a fraction shares one (0.5: two workers a GPU)")
    cpus: float = Field(1.0, gt=0, description="CPUs per worker (on a CPU cluster: its torch threads, at least 1)")
    workers: _Workers | None = Field(
        None, description="a fixed number of workers, never rebalanced, or {min, max}: "
                                "a range the balancer keeps the stage within")
    weight: float = Field(1.0, gt=0, description="the stage's share of the cluster until seconds per row are measured")


class StageRenderConfig(_Section):
    """The render settings a stage fixes for itself; the rest come from each row (its column,
    or the job's render section). Frames, seed and fps are the row's in every stage; an earlier
    stage may render at a size of its own (an image model near the size it was trained at), and
    the next stage takes its picture resized to the row's by ``render.media_resize``."""

    height: int | None = Field(None, ge=8, description="an earlier stage's own height (default: the row's)")
    width: int | None = Field(None, ge=8, description="an earlier stage's own width (default: the row's)")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    strength: float | None = Field(None, ge=0, le=1)
    batch_size: int | None = Field(None, ge=1, description="rows of equal shape in one call of this stage's model")

    _finite = field_validator("guidance_scale")(lambda value: _check_finite(value))

    def overrides(self) -> dict[str, Any]:
        """The per-row parameters this stage fixes."""
        return {k: v for k, v in self.model_dump(exclude={"batch_size"}).items() if v is not None}


# Artifact names a stage may not take: the final video's and its previews'.
_RESERVED_STAGE_NAMES = ("video", "gif", "webp", "poster")


class TextStageConfig(_Section):
    """A text stage (the first of ``stages:``): its model, a causal LM, rewrites each row's
    prompt for the stages after it (see rendering.text)."""

    system_prompt: str = Field("t2v", description="t2v or i2v (shipped), or the path of a UTF-8 "
                                                  "text file; {words} becomes target_words")
    target_words: int = Field(80, ge=5, le=2000, description="the rewrite's length the system prompt asks for")
    max_new_tokens: int = Field(256, ge=1, le=16384, description="tokens the model may write at most")
    temperature: float = Field(0.0, ge=0, le=10, description="0: greedy; else sampled, seeded by the row's seed")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, description="chats in one generate call")
    variations: int = Field(1, ge=1, le=1000, description="rows made of each input row, each with its own rewrite")
    on_bad_rewrite: Literal["fallback", "fail"] = Field(
        "fallback", description="an empty, too long or non-text rewrite: render the row's own "
                                "prompt (the reason recorded), or fail the row")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="the rewrite's limit in the video model's prompt tokens (none: "
                                "the limit its pipeline reads)")
    cache_uri: str | None = Field(None, description="where rewrites are cached (none: cache/rewrites under the output)")

    _finite = field_validator("temperature", "top_p")(lambda value: _check_finite(value))

    @field_validator("system_prompt")
    @classmethod
    def _readable(cls, value: str) -> str:
        text_prompts.system_prompt(value, 1)  # raises ValueError naming the file's problem
        return value

    @field_validator("cache_uri")
    @classmethod
    def _cache_uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_uri(value)

    @model_validator(mode="after")
    def _variations_need_sampling(self) -> "TextStageConfig":
        if self.variations > 1 and self.temperature == 0:
            raise ValueError("variations > 1 needs sampling (greedy decoding writes one rewrite "
                             "per prompt): set temperature, e.g. 0.8")
        return self

    def system_prompt_text(self) -> str:
        return text_prompts.system_prompt(self.system_prompt, self.target_words)


class StageConfig(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$",
                      description="names the stage in logs, the manifest and stages/<name>/ under the output")
    model: ModelConfig
    text: TextStageConfig | None = Field(
        None, description="a text stage: model is a causal LM that rewrites each row's prompt")
    render: StageRenderConfig = Field(default_factory=StageRenderConfig)
    optimize: OptimizeConfig | None = Field(None, description="default: the job's optimize section")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


class ClusterConfig(_Section):
    backend: Literal["ray", "inline"] = Field(
        "ray", description="inline: render in the driver process without Ray (debugging, tests)")
    address: str | None = Field(None, description="none: start a local cluster; 'auto' or host:port: join")
    num_workers: int | None = Field(
        None, ge=1, description="a fixed number of workers (none: elastic, from min_workers up to max_workers)")
    min_workers: int = Field(1, ge=1, description="elastic: workers started at once (placed, or waiting for capacity)")
    max_workers: int | None = Field(
        None, ge=1, description="elastic: the most workers (none: as many as the cluster can hold, now or later)")
    gpus_per_worker: float | None = Field(
        None, ge=0, le=64, description="GPUs each worker holds (none: 1 when the cluster has GPUs or its "
                                       "autoscaler reports GPU node types, else 0)")
    capacity_timeout_s: float = Field(
        1800.0, gt=0, description="how long a job waits for its first worker to be placed (GPU nodes to come up)")
    cpus_per_worker: int = Field(1, ge=1)
    backups: bool = Field(True, description="at the tail, idle workers take a backup copy of a late "
                                            "shard; the first copy back is committed")
    max_attempts: int = Field(3, ge=1, description="attempts per row before it is recorded as failed")
    shard_timeout_s: float = Field(3600.0, gt=0, description="a shard running longer is a hung worker")
    shards_in_flight_per_worker: int = Field(2, ge=1, description="queued shards keep workers fed")
    stage_backlog_rows: int | None = Field(
        None, ge=1, description="stages: rows a stage may hold done but not yet taken up by the "
                                "next (default: two rounds of shards for the next stage's workers)")
    balance: Literal["auto", "fixed"] = Field(
        "auto", description="stages: move workers to the slowest stage once seconds per row are measured")
    rebalance_every_s: float = Field(300.0, gt=0, description="stages: how often the split of workers is reconsidered")

    @model_validator(mode="after")
    def _fixed_or_a_range(self) -> "ClusterConfig":
        if self.num_workers is not None and (self.max_workers is not None or self.min_workers != 1):
            raise ValueError("give num_workers (a fixed count) or min_workers/max_workers "
                             "(a range), not both")
        if self.max_workers is not None and self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} is over max_workers "
                             f"{self.max_workers}")
        return self


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="export the job's metrics through Ray's metrics agents "
                                            "(Prometheus)")
    job_name: str | None = Field(None, min_length=1, max_length=128,
                                 description="the reelfarm_job label (none: the output's folder name)")


class JobConfig(_Section):
    input: InputConfig
    model: ModelConfig | None = Field(None, description="the model of a single-stage job")
    stages: list[StageConfig] | None = Field(
        None, description="a multi-stage job (text -> image -> video): each stage with its own model and workers")
    render: RenderConfig = Field(default_factory=RenderConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _one_model_or_stages(self) -> "JobConfig":
        if self.model is None and self.stages is None:
            raise ValueError("model: required key is missing (a multi-stage job gives stages: "
                             "instead)")
        if self.model is not None and self.stages is not None:
            raise ValueError("give either model (a single-stage job) or stages (a multi-stage "
                             "job), not both")
        if self.stages is not None:
            names = [stage.name for stage in self.stages]
            if not names:
                raise ValueError("stages: list at least one stage")
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"stages: names must differ; {', '.join(repeated)} is used twice")
            self._text_stage_leads()
            reserved = [n for n in names[:-1] if n in _RESERVED_STAGE_NAMES]
            if reserved:
                raise ValueError(f"stages: {reserved[0]!r} names an artifact of the final video; "
                                 f"name the stage otherwise (e.g. keyframe)")
            self._stage_sizes_fit()
        return self

    @property
    def variations(self) -> int:
        """Rows made of each input row: a text stage's ``variations``, else 1."""
        text = self.stages[0].text if self.stages else None
        return text.variations if text is not None else 1

    def _text_stage_leads(self) -> None:
        """A text stage comes first, with later stages to render what it writes, and only it
        takes a language model."""
        for i, stage in enumerate(self.stages):
            key = f"stages.{stage.name}"
            if stage.text is None:
                if is_tiny_lm(stage.model.path):
                    raise ValueError(f"{key}.model: {stage.model.path} is a language model: "
                                     f"only a text stage (with text:) takes it")
                continue
            if i != 0 or len(self.stages) == 1:
                raise ValueError(f"{key}: a text stage must lead stages:, before the stages that "
                                 f"render what it writes")
            model = stage.model
            if tiny.is_tiny(model.path) and not is_tiny_lm(model.path):
                raise ValueError(f"{key}.model: {model.path} is a diffusers pipeline: a text "
                                 f"stage takes a causal LM (a hub id, a folder, or tiny:lm)")
            if model.pipeline or model.scheduler or model.scheduler_config or model.variant:
                raise ValueError(f"{key}.model: a text stage's model takes path, revision and "
                                 f"dtype only")
            if stage.render.overrides() or stage.render.batch_size or stage.optimize:
                raise ValueError(f"{key}: a text stage renders nothing: its settings go under "
                                 f"text: (batch_size too), not render: or optimize:")

    def _stage_sizes_fit(self) -> None:
        """The video's size is the row's: only an earlier stage renders at a size of its own,
        within the limits, and its picture must be resizable to the row's."""
        last = self.stages[-1]
        if last.render.height is not None or last.render.width is not None:
            raise ValueError(f"stages.{last.name}.render: height and width of the last stage are "
                             f"the row's (its columns, or render.height/width)")
        for stage in self.stages[:-1]:
            r = stage.render
            for side in params.SIDES:
                value = getattr(r, side)
                problem = None if value is None else \
                    params.value_problem(params.BY_NAME[side], value, self)
                if problem:
                    raise ValueError(f"stages.{stage.name}.render.{problem}")
            if (r.height or r.width) and self.render.media_resize == "error":
                raise ValueError(f"stages.{stage.name}.render sets its own size, and "
                                 f"render.media_resize 'error' would fail every row at the next "
                                 f"stage: set media_resize to crop or fit")

    @model_validator(mode="after")
    def _skipping_needs_dedup(self) -> "JobConfig":
        if self.output.webdataset and self.output.webdataset.skip_duplicates \
                and self.quality.dedup is None:
            raise ValueError("output.webdataset.skip_duplicates leaves out what dedup finds: it "
                             "needs quality.dedup")
        return self

    @model_validator(mode="after")
    def _last_model_makes_videos(self) -> "JobConfig":
        """An image model can only make keyframes for a later stage; refused here when its
        class is known without loading it (a tiny kind, or model.pipeline), else by the worker."""
        key, model = (("model", self.model) if self.model is not None
                      else (f"stages.{self.stages[-1].name}.model", self.stages[-1].model))
        name = model.pipeline or (tiny.tiny_configs(tiny.tiny_kind(model.path)).pipeline
                                  if tiny.is_tiny(model.path) else None)
        problem = final_stage_problem(adapter_named(name)) if name is not None else None
        if problem:
            raise ValueError(f"{key}: {problem}")
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "JobConfig":
        for param in params.PARAMS:
            default = param.default_of(self)
            problem = None if default is None else params.value_problem(param, default, self)
            if problem:
                raise ValueError(f"{param.default.split('.')[0]}.{problem}")
        return self

    @model_validator(mode="after")
    def _local_model_exists(self) -> "JobConfig":
        """A missing local model folder is found here, not after a cluster has started.

        Only explicit local paths are checked, and only for a cluster this machine starts: a
        joined cluster's workers may see folders the driver does not.
        """
        local_cluster = self.cluster.address is None and not os.environ.get("RAY_ADDRESS")
        models = ([("model", self.model)] if self.model is not None else
                  [(f"stages.{s.name}.model", s.model) for s in self.stages])
        texts = {f"stages.{s.name}.model" for s in self.stages or () if s.text is not None}
        for key, model in models:
            path = model.path
            if local_cluster and path.startswith(("/", "./", "../", "~")) and key in texts:
                if not (Path(path).expanduser() / "config.json").is_file():
                    raise ValueError(f"{key}.path: {path} is not a transformers model folder (no "
                                     f"config.json there): check the path, or give a hub id or "
                                     f"tiny:lm")
            elif local_cluster and path.startswith(("/", "./", "../", "~")):
                folder = Path(path).expanduser()
                if not (folder / "model_index.json").is_file():
                    raise ValueError(f"{key}.path: {path} is not a diffusers model folder (no "
                                     f"model_index.json there): check the path, or give a hub "
                                     f"id or tiny:modelscope")
        return self


# The sections whose values change what a video looks like: a resumed output must match them.
OUTPUT_SECTIONS = ("model", "render", "optimize", "encode", "quality")
# Settings within those sections that change speed, not pixels.
_NOT_FINGERPRINTED = {"render": {"batch_size"}, "quality": {"dedup"}}
# Settings added after format 1, left out of the fingerprint at the value that behaves as
# reelfarm did before them, so outputs made before they existed resume.
_FINGERPRINTED_UNLESS = {"quality.on_unsafe": "keep", "quality.aesthetic_model": None,
                         "quality.aesthetic_revision": None, "quality.static_threshold": 0.2,
                         "quality.rules": []}
# Settings elsewhere that change what the output holds: the carried columns are manifest
# columns, and shards with other columns would not read back as one table.
_ALSO_FINGERPRINTED = (("input", "carry_columns"),)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> JobConfig:
    """Read a YAML config (or start from ``base``), apply ``key=value`` overrides, validate.

    Relative local paths written in the file resolve against the file's folder, as docker
    compose does, so a config works from any directory; those given on the command line
    (overrides, --input, --output) resolve against the current directory, as shells do.
    """
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        data = _relative_to(_read_yaml(Path(path)), Path(path).parent)
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    return validate(data)


def validate(data: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(redact(_first_error(exc))) from None


def with_absolute_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its local input, output and media-root paths made absolute against this
    process's folder. The driver hands workers one absolute output: a relative one would be
    resolved in each worker's own folder and split the output between machines and folders."""
    out = cfg.model_copy(deep=True)
    out.input.uri = storage.absolute(out.input.uri)
    out.output.uri = storage.absolute(out.output.uri)
    if out.input.media_roots is not None:
        out.input.media_roots = [storage.absolute(root) for root in out.input.media_roots]
    return out


def fingerprint_fields(cfg: JobConfig) -> dict[str, Any]:
    """The flattened settings that decide what every video looks like: with stages, every
    stage's model, fixed render settings and optimize options, under its name and in order (a
    keyframe made for one video model is not silently reused for another)."""
    fields = {}
    for section in OUTPUT_SECTIONS:
        values = getattr(cfg, section)
        if values is None:  # model, in a multi-stage job
            continue
        skip = _NOT_FINGERPRINTED.get(section, set())
        for key, value in values.model_dump().items():
            name = f"{section}.{key}"
            if key not in skip and _FINGERPRINTED_UNLESS.get(name, object()) != value:
                fields[name] = value
    for i, stage in enumerate(cfg.stages or []):
        optimize = stage.optimize or cfg.optimize
        for section, values in (("model", stage.model.model_dump()),
                                ("render", stage.render.overrides()),
                                ("optimize", optimize.model_dump()), ("text", _text_fields(stage))):
            for key, value in values.items():
                fields[f"stages.{i}.{stage.name}.{section}.{key}"] = value
    for section, key in _ALSO_FINGERPRINTED:
        fields[f"{section}.{key}"] = getattr(getattr(cfg, section), key)
    return fields


def _text_fields(stage: StageConfig) -> dict[str, Any]:
    """A text stage's settings that change what it writes, the system prompt's text by its
    sha256 (a file edited since is a change); its batch size and cache are speed only."""
    if stage.text is None:
        return {}
    values = stage.text.model_dump(exclude={"batch_size", "cache_uri"})
    values["system_prompt_sha256"] = text_prompts.sha256(stage.text.system_prompt_text())
    return values


def fingerprint(cfg: JobConfig) -> str:
    canonical = json.dumps(fingerprint_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Keys that hold local paths, and whether a bare relative value counts (a model path "org/name"
# is a hub id: only ./ and ../ make it a folder).
_PATH_KEYS = {("input", "uri"): True, ("output", "uri"): True, ("input", "media_roots"): True,
              ("model", "path"): False}


def _relative_to(data: dict, folder: Path) -> dict:
    """``data`` with the relative local paths of ``_PATH_KEYS`` joined to ``folder``."""
    def resolve(value, bare: bool):
        if not isinstance(value, str) or "://" in value or value.startswith(("/", "~", "tiny:")):
            return value
        if not bare and not value.startswith(("./", "../")):
            return value
        return os.path.abspath(os.path.join(folder, value))

    stages = data.get("stages")
    stage_models = [(stage, "model") for stage in stages if isinstance(stage, dict)] \
        if isinstance(stages, list) else []
    for stage, _ in stage_models:  # a text stage's own system prompt file, like a model folder
        text = stage.get("text")
        if isinstance(text, dict) and isinstance(text.get("system_prompt"), str):
            text["system_prompt"] = resolve(text["system_prompt"], False)
    for (section, key), bare in _PATH_KEYS.items():
        holders = [data] + ([s for s, _ in stage_models] if section == "model" else [])
        for holder in holders:
            values = holder.get(section)
            if not isinstance(values, dict) or values.get(key) is None:
                continue
            value = values[key]
            values[key] = [resolve(v, bare) for v in value] if isinstance(value, list) \
                else resolve(value, bare)
    return data


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config {path}{line} is not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. render.num_frames=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted; a stage by its name or index: ``stages.keyframe.render.height``)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # the stages
            child = next((s for s in node if isinstance(s, dict) and s.get("name") == part),
                         node[int(part)] if part.isdigit() and int(part) < len(node) else None)
            if child is None:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no stage {part!r}")
        else:
            child = node.setdefault(part, {})
        if not isinstance(child, dict) and not (isinstance(child, list) and part == "stages"):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _first_error(exc: ValidationError) -> str:
    """One line naming the key: the first problem pydantic found, in our words."""
    err = exc.errors()[0]
    loc = tuple(p for i, p in enumerate(err["loc"])  # not the reading of resources.workers
                if not (i and err["loc"][i - 1] == "workers" and p in ("count", "range")))
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = err.get("input")
    shown = "" if isinstance(got, dict) or not key else f" (got {got!r})"
    count = exc.error_count()
    more = f" [and {count - 1} more problem{'s' if count > 2 else ''}]" if count > 1 else ""
    return f"{key}: {message}{shown}{more}" if key else f"{message}{more}"


def _did_you_mean(loc: tuple) -> str:
    """``; did you mean render.num_frames?`` for an unknown key close to a key of its section."""
    section: Any = JobConfig
    for part in loc[:-1]:
        if not isinstance(part, int):  # a list index (stages.0) stays in the same model
            field = section.model_fields.get(part)
            section = _section_of(field.annotation) if field is not None else None
            if section is None:
                return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


def _section_of(annotation) -> type[BaseModel] | None:
    """The config section a field holds (``ModelConfig | None``, ``list[StageConfig]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_of, get_args(annotation))), None)
