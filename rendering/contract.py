"""The contract between driver and worker: how to build a worker, one task (a resolved row) to
render, and what became of it (artifacts, metrics, or an error code).

All of it is small, picklable and free of torch, so the driver can build it without loading
any model code; frames and model state never leave the worker.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rendering.quality import GateSpec


@dataclass(frozen=True)
class ModelSpec:
    path: str  # a local diffusers folder, a hub id, or tiny:<kind>
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"
    pipeline: str | None = None  # the pipeline class to load as; None: the one the model names
    scheduler: str | None = None  # a diffusers scheduler class name; None keeps the model's own
    scheduler_config: tuple = ()  # (key, value) overrides for the scheduler's from_config


@dataclass(frozen=True)
class MediaSpec:
    """Where a worker may read a row's conditioning media from, and how much of it."""

    roots: tuple[str, ...] = ()  # URI prefixes; media anywhere else fails its row unread
    resize: str = "crop"  # crop | fit | error: what to do when media and row differ in size
    max_bytes: int = 256 << 20
    max_pixels: int = 4096 * 4096  # per image or frame: a decompression bomb stops here
    max_video_frames: int = 4096  # frames decoded at most from one input video
    decode_timeout_s: float = 120.0


@dataclass(frozen=True)
class ScoringSpec:
    """The models and settings that score every rendered video: CLIP (rendering.scoring), the
    aesthetic head (rendering.aesthetic) and motion (rendering.motion)."""

    model: str  # a hub id, a local folder, an fsspec URL of a folder, or tiny:clip
    revision: str | None = None
    drift_threshold: float = 20.0  # a frame scoring below this (0-100 scale) has drifted
    batch_frames: int = 64  # frames through the image encoder at once
    dtype: str = "float32"
    aesthetic_model: str | None = None  # an MLP head over the image embedding (rendering.aesthetic)
    aesthetic_revision: str | None = None
    static_threshold: float = 0.2  # mean flow (px per frame, rendering.motion) under which a clip is static


@dataclass(frozen=True)
class OptimizeSpec:
    """Speed and memory options applied to a loaded pipeline (see jobs.config.OptimizeConfig)."""

    attention_backend: str | None = None
    compile: str = "none"  # none | repeated_blocks | full
    offload: str = "none"  # none | model | sequential
    vae_slicing: bool = False
    vae_tiling: bool = False
    first_block_cache_threshold: float | None = None


@dataclass(frozen=True)
class EncodeSpec:
    crf: int = 18
    preset: str = "medium"
    timeout_s: float = 600.0


@dataclass(frozen=True)
class TextSpec:
    """A text stage: how its causal LM rewrites each row's prompt (see rendering.text)."""

    system_prompt: str  # the text itself, target length filled in
    system_prompt_sha256: str
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy; else sampled with the row's seed
    top_p: float = 1.0
    top_k: int | None = None
    on_bad_rewrite: str = "fallback"  # fallback (to the row's prompt) | fail (the row)
    cache_uri: str | None = None  # where rewrites are cached (None: not at all)
    limit_model: ModelSpec | None = None  # the video model, whose prompt limit a rewrite fits
    max_prompt_tokens: int | None = None  # overrides that model's own limit
    engine: str = "transformers"  # what generates: transformers | vllm (a GPU worker's)
    gpu_fraction: float = 1.0  # the share of a GPU each worker holds: vLLM's memory budget


@dataclass(frozen=True)
class WorkerSpec:
    model: ModelSpec
    encode: EncodeSpec
    output_uri: str  # the job's output prefix; artifacts are named relative to it
    artifact_dir: str  # where the stage's artifact (the video, or a keyframe) goes under the output
    receipts_dir: str  # where a receipt goes once a row's artifacts are durable
    previews_dir: str  # where previews (gif, webp, poster) go under the output
    batch_size: int = 1
    torch_threads: int | None = None  # CPU workers: the CPUs the worker holds
    optimize: OptimizeSpec = field(default_factory=OptimizeSpec)
    media: MediaSpec = field(default_factory=MediaSpec)
    previews: tuple[str, ...] = ()  # preview kinds: gif, webp, poster
    preview_max_side: int = 256
    scoring: ScoringSpec | None = None  # CLIP scores of every video
    gate: GateSpec | None = None  # what a video under quality.min_score does
    # What a picture the pipeline's safety checker flags (and blacks out) does: keep (marked),
    # fail (the row fails as unsafe_content) or retry (new seeds, up to unsafe_max_tries renders).
    on_unsafe: str = "keep"
    unsafe_max_tries: int = 3
    artifact_name: str = "video"  # the name the stage's artifact has among the row's artifacts
    final: bool = True  # the job's last stage: it must make videos
    # Where the worker stores a probe object at start (None: none): the driver reads it back
    # to prove that it and the worker see one output.
    probes_dir: str | None = None
    text: TextSpec | None = None  # a text stage: model is a causal LM that rewrites prompts


MEDIA_ROLES = ("image", "video")  # conditioning inputs a row may carry, by role


@dataclass(frozen=True)
class MediaInput:
    """A row's conditioning input: a URI to read (checked against the media roots first) or
    bytes that came inline in the input row. ``sha256`` is known up front only for bytes."""

    uri: str | None = None
    data: bytes | None = None
    sha256: str | None = None

    @property
    def identity(self) -> str:
        """What tells two inputs apart without reading them: the bytes' hash, else the URI."""
        return f"sha256:{self.sha256}" if self.sha256 else f"uri:{self.uri}"


@dataclass(frozen=True)
class Task:
    """One fully resolved row: every value its outputs depend on is fixed here.

    ``params`` holds the per-row parameters of the driver's parameter table (num_frames,
    height, width, ...); ``inputs`` the conditioning media by role; ``batch_key`` says which
    tasks may share one pipeline call (the adapter may still split them).
    """

    id: str
    key: str  # object name stem under the output, derived safely from the id
    seed: int
    prompt: str | None
    params: dict
    inputs: dict[str, MediaInput] = field(default_factory=dict)
    batch_key: tuple = ()

    def identity(self) -> dict:
        """What the outputs depend on, JSON-ready: the task without its inline bytes."""
        return {"id": self.id, "key": self.key, "seed": self.seed, "prompt": self.prompt,
                "params": self.params,
                "inputs": {role: m.identity for role, m in sorted(self.inputs.items())}}


@dataclass(frozen=True)
class Artifact:
    """One stored object a row produced (its video, later its previews or keyframes)."""

    name: str  # what it is: video, poster, ...
    path: str  # relative to the output root, so a copied or synced output stays whole
    bytes: int
    sha256: str
    kind: str  # "video", "image" or "preview": what the next stage may take it as


@dataclass
class Result:
    """The outcome of one attempt at one row. Workers return these and never raise."""

    id: str
    ok: bool
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # prompt_truncated, input_<role>_sha256, ...
    timings_s: dict[str, float] = field(default_factory=dict)
    error_code: str | None = None  # machine-readable: render_error, invalid_media, ...
    error: str | None = None
    retryable: bool = False

    @classmethod
    def failure(cls, task_id: str, code: str, message: str, retryable: bool,
                metrics: dict | None = None) -> "Result":
        return cls(id=task_id, ok=False, error_code=code, error=f"{code}: {message}",
                   retryable=retryable, metrics=dict(metrics or {}))

    def artifact(self, name: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == name), None)


def receipt_json(task: Task, result: Result) -> bytes:
    """A durable row's receipt: the task it answers and what it stored."""
    return json.dumps({"task": task.identity(), "artifacts": [dataclasses.asdict(a) for a in result.artifacts],
                       "metrics": result.metrics, "timings_s": result.timings_s}).encode()


def read_receipt(data: bytes, task: Task) -> Result | None:
    """The result a receipt records, if it answers exactly ``task``; else None (so is a
    receipt written before artifacts carried their kind: its row is rendered again)."""
    try:
        receipt = json.loads(data)
        if receipt["task"] != json.loads(json.dumps(task.identity())):
            return None
        return Result(id=task.id, ok=True, artifacts=[Artifact(**a) for a in receipt["artifacts"]],
                      metrics=receipt.get("metrics") or {}, timings_s=receipt.get("timings_s") or {})
    except (ValueError, KeyError, TypeError):
        return None
