"""What crosses between the driver and a worker: how to build it, one row to render, and what
became of that row.

All of it is small, picklable and free of torch, so the driver can build it without loading
any model code; frames and model state never leave the worker.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    path: str  # a local diffusers folder, a hub id, or tiny:<kind>
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"


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
class WorkerSpec:
    model: ModelSpec
    encode: EncodeSpec
    videos_uri: str  # where videos go: <output>/videos
    receipts_uri: str  # where a receipt goes once a video is durable: <output>/receipts
    batch_size: int = 1
    torch_threads: int | None = None  # CPU workers: the CPUs the worker holds
    optimize: OptimizeSpec = field(default_factory=OptimizeSpec)


@dataclass(frozen=True)
class RenderTask:
    """One fully resolved row: every parameter the video depends on is fixed here."""

    id: str
    key: str  # object name under the output's videos/ prefix, derived safely from the id
    prompt: str
    negative_prompt: str | None
    seed: int
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    attempts: int = 0  # attempts already spent on this row before this one

    @property
    def batch_key(self) -> tuple:
        """Rows with equal batch keys can share one pipeline call."""
        return (self.num_frames, self.height, self.width, self.num_inference_steps,
                self.guidance_scale, self.negative_prompt is None)


@dataclass
class RenderResult:
    """The outcome of one attempt at one row. Workers return these and never raise."""

    id: str
    ok: bool
    video_uri: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    error_code: str | None = None  # machine-readable: render_error, encode_error, upload_error, ...
    error: str | None = None
    retryable: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)
    prompt_truncated: bool | None = None  # the text encoder read only its first tokens (None: unknown)

    @classmethod
    def failure(cls, task_id: str, code: str, message: str, retryable: bool) -> "RenderResult":
        return cls(id=task_id, ok=False, error_code=code, error=f"{code}: {message}",
                   retryable=retryable)


def receipt_json(task: RenderTask, result: RenderResult) -> bytes:
    """A durable video's receipt: the task it answers and the object's size and hash."""
    return json.dumps({"task": _receipt_task(task), "video_uri": result.video_uri, "bytes": result.bytes,
                       "sha256": result.sha256, "timings_s": result.timings_s}).encode()


def read_receipt(data: bytes, task: RenderTask) -> RenderResult | None:
    """The result a receipt records, if it answers exactly ``task``; else None."""
    try:
        receipt = json.loads(data)
        if receipt["task"] != _receipt_task(task):
            return None
        return RenderResult(id=task.id, ok=True, video_uri=receipt["video_uri"],
                            bytes=receipt["bytes"], sha256=receipt["sha256"],
                            timings_s=receipt.get("timings_s") or {})
    except (ValueError, KeyError, TypeError):
        return None


def _receipt_task(task: RenderTask) -> dict:
    """What a video depends on: the task without its attempt count."""
    fields = dataclasses.asdict(task)
    fields.pop("attempts")
    return fields
