"""A stage of a multi-stage job: its model, its own render settings, its workers, and a text
stage's rewriting settings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from jobs.config.base import Section, check_finite, check_uri
from jobs.config.sections import ClusterConfig, ModelConfig, OptimizeConfig
from rendering.text import prompts as text_prompts


class WorkerRange(Section):
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


class ResourcesConfig(Section):
    """What one worker of a stage holds, and how many workers the stage gets."""

    gpus: float = Field(1.0, gt=0, le=64, description="GPUs per worker on a GPU cluster; a fraction shares one (0.5: two workers a GPU)")
    cpus: float = Field(1.0, gt=0, description="CPUs per worker (on a CPU cluster: its torch threads, at least 1)")
    workers: _Workers | None = Field(
        None, description="a fixed number of workers, never rebalanced, or {min, max}: "
                                "a range the balancer keeps the stage within")
    weight: float = Field(1.0, gt=0, description="the stage's share of the cluster until seconds per row are measured")


class StageRenderConfig(Section):
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

    _finite = field_validator("guidance_scale")(lambda value: check_finite(value))

    def overrides(self) -> dict[str, Any]:
        """The per-row parameters this stage fixes."""
        return {k: v for k, v in self.model_dump(exclude={"batch_size"}).items() if v is not None}


# Artifact names a stage may not take: the final video's and its previews'.
RESERVED_STAGE_NAMES = ("video", "gif", "webp", "poster")


class TextStageConfig(Section):
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
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="what generates: vllm (the reelfarm[vllm] extra) on the "
                                    "stage's GPU, or transformers")

    _finite = field_validator("temperature", "top_p")(lambda value: check_finite(value))

    @field_validator("system_prompt")
    @classmethod
    def _readable(cls, value: str) -> str:
        text_prompts.system_prompt(value, 1)  # raises ValueError naming the file's problem
        return value

    @field_validator("cache_uri")
    @classmethod
    def _cache_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value)

    @model_validator(mode="after")
    def _variations_need_sampling(self) -> "TextStageConfig":
        if self.variations > 1 and self.temperature == 0:
            raise ValueError("variations > 1 needs sampling (greedy decoding writes one rewrite "
                             "per prompt): set temperature, e.g. 0.8")
        return self

    def system_prompt_text(self) -> str:
        return text_prompts.system_prompt(self.system_prompt, self.target_words)

    def engine_problem(self, gpus: float, cluster: ClusterConfig) -> str | None:
        """Why the stage's workers cannot run its engine: vLLM runs on one GPU or a share of one."""
        if self.engine != "vllm":
            return None
        if cluster.gpus_per_worker == 0:
            return ("vllm needs a GPU, and cluster.gpus_per_worker: 0 gives the workers none: "
                    "give them GPUs, or set engine: transformers")
        return None if gpus <= 1 else (f"vllm runs on one GPU or a share of one, and "
                                       f"resources.gpus is {gpus:g}: set it to 1 or less")


class StageConfig(Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$",
                      description="names the stage in logs, the manifest and stages/<name>/ under the output")
    model: ModelConfig
    text: TextStageConfig | None = Field(
        None, description="a text stage: model is a causal LM that rewrites each row's prompt")
    render: StageRenderConfig = Field(default_factory=StageRenderConfig)
    optimize: OptimizeConfig | None = Field(None, description="default: the job's optimize section")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
