"""The whole job: its sections, and the checks that need more than one of them."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from jobs import params
from jobs.config.base import Section
from jobs.config.quality import QualityConfig
from jobs.config.sections import (ClusterConfig, EncodeConfig, InputConfig, LimitsConfig,
                                  MetricsConfig, ModelConfig, OptimizeConfig, OutputConfig,
                                  RenderConfig)
from jobs.config.stages import RESERVED_STAGE_NAMES, StageConfig
from rendering.pipelines import adapter_named, final_stage_problem, tiny
from rendering.text.tiny import is_tiny_lm


class JobConfig(Section):
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
            reserved = [n for n in names[:-1] if n in RESERVED_STAGE_NAMES]
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
            problem = stage.text.engine_problem(stage.resources.gpus, self.cluster)
            if problem:
                raise ValueError(f"{key}.text.engine: {problem}")

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
