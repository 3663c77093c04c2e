"""The job's sections that are not about stages or quality: input, model, render, limits,
encode, optimize, output, cluster, metrics."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs.config.base import Section, check_finite, check_uri, switch
from jobs.params import MAX_FPS
from rendering.pipelines import adapter_named, tiny
from rendering.pipelines.schedulers import declared_scheduler_names, unknown_scheduler
from rendering.text.tiny import is_tiny_lm


class InputConfig(Section):
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
            check_uri(root)
        return value

    _uri = field_validator("uri")(check_uri)


class ModelConfig(Section):
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


class RenderConfig(Section):
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

    _finite = field_validator("guidance_scale")(lambda value: check_finite(value))


class LimitsConfig(Section):
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


class EncodeConfig(Section):
    fps: int = Field(8, ge=1, le=MAX_FPS)
    crf: int = Field(18, ge=0, le=51, description="x264 quality: lower is better and larger")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                    "slower", "veryslow"] = "medium"
    previews: list[Literal["gif", "webp", "poster"]] = Field(
        default_factory=list, description="small previews stored beside each video: gif, webp, poster (JPEG)")
    preview_max_side: int = Field(256, ge=16, description="previews are scaled down to this longer side")


class OptimizeConfig(Section):
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


class WebDatasetConfig(Section):
    rows_per_shard: int = Field(1000, ge=1, description="rows of the input per tar shard (failed rows are listed, not packed)")
    skip_duplicates: bool = Field(
        False, description="leave out the rows quality.dedup marks (listed, not packed): tars are packed after it, at the end of the run")


class OutputConfig(Section):
    uri: str = Field(description="output prefix on any fsspec URL")
    shard_size: int = Field(64, ge=1, description="rows per shard: the unit of scheduling and commit")
    segment_shards: int = Field(64, ge=1, description="committed shards folded into one manifest "
                                "segment: what is done stays a few reads at millions of rows")
    webdataset: WebDatasetConfig | None = Field(
        None, description="pack rows into WebDataset tar shards: true, or a mapping of options")
    keep_videos: bool = Field(True, description="false: drop the loose videos once packed into shards")

    _webdataset_switch = field_validator("webdataset", mode="before")(switch)

    @model_validator(mode="after")
    def _packing_before_dropping(self) -> "OutputConfig":
        if not self.keep_videos and self.webdataset is None:
            raise ValueError("output.keep_videos: false drops videos once they are packed, so it "
                             "needs output.webdataset")
        return self

    _uri = field_validator("uri")(check_uri)


class ClusterConfig(Section):
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


class MetricsConfig(Section):
    enabled: bool = Field(True, description="export the job's metrics through Ray's metrics agents "
                                            "(Prometheus)")
    job_name: str | None = Field(None, min_length=1, max_length=128,
                                 description="the reelfarm_job label (none: the output's folder name)")
