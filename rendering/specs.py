"""What crosses between the driver and a worker: how to build it, one row to render, and what
became of that row.

All of it is small, picklable and free of torch, so the driver can build it without loading
any model code; frames and model state never leave the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    path: str  # a local diffusers folder, a hub id, or tiny:<kind>
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"


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
    batch_size: int = 1
    torch_threads: int | None = None  # CPU workers: the CPUs the worker holds


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

    @classmethod
    def failure(cls, task_id: str, code: str, message: str, retryable: bool) -> "RenderResult":
        return cls(id=task_id, ok=False, error_code=code, error=f"{code}: {message}",
                   retryable=retryable)
