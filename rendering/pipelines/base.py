"""What every pipeline adapter declares, and the defaults most families share.

An adapter is data plus two small hooks: which inputs its pipeline accepts and requires, how
rows may batch, which shapes it renders exactly (``shape_problem``, over ``ShapeFacts`` read from
a loaded pipeline or from the model's config files alone), and how a batch of tasks becomes
call kwargs (``call_kwargs``). The worker reads the declarations; an adapter never
loads, schedules or stores anything. Adding a family is one module of adapters beside this one.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from rendering.contract import Task
from rendering.pipelines.shapes import ShapeFacts, denoiser_config, with_defaults


class Adapter:
    """The defaults of a text-to-video pipeline called with lists of prompts and generators."""

    pipeline: ClassVar[str]  # the diffusers pipeline class this adapter drives
    family: ClassVar[str]
    # What one row becomes: "video" (frames, stored as an MP4), or "image" (one picture, stored
    # as a PNG: a keyframe that a later stage animates).
    makes: ClassVar[str] = "video"
    takes_prompt: ClassVar[bool] = True
    takes_negative_prompt: ClassVar[bool] = True
    takes_guidance: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()  # conditioning roles every row must carry
    takes_strength: ClassVar[bool] = False
    # False: the pipeline takes its frame count from the input video (the worker hands it
    # exactly num_frames frames), not from a num_frames argument.
    takes_num_frames: ClassVar[bool] = True
    # Rows per call at most; 1: it cannot batch. Batching is a speed option: a batched call
    # rounds differently from single ones (about 1e-7..1e-5 on CPU, enough to flip an occasional
    # stored pixel), so videos reproduce byte for byte under the same render.batch_size.
    max_batch: ClassVar[int | None] = None
    # It accepts a list of generators, one per video. False: one generator per call (batch 1).
    generator_list: ClassVar[bool] = True
    # It draws some noise from torch's global RNG: the worker seeds it per call, and batches of
    # one keep each video independent of its batch mates.
    global_rng: ClassVar[bool] = False
    # The output field that says, per picture, whether the pipeline's safety checker flagged
    # it (and blacked it out): SD 1.x's ``nsfw_content_detected``. None: no checker to read.
    safety_flag: ClassVar[str | None] = None

    @classmethod
    def for_pipe(cls, pipe) -> type[Adapter]:
        """This adapter as the loaded model's own configs declare it: a family whose
        checkpoints differ in how they may batch (LTX's VAE versions) returns a variant."""
        return cls

    @classmethod
    def prepare(cls, pipe) -> None:
        """Ready a freshly loaded pipeline for this adapter's calls (I2VGen-XL's text encoder
        under transformers 5); most need nothing."""

    @classmethod
    def batch_limit(cls, configured: int) -> int:
        """How many rows one call may take, given ``render.batch_size``."""
        if cls.global_rng or not cls.generator_list:
            return 1
        return min(configured, cls.max_batch) if cls.max_batch else configured

    @classmethod
    def task_problem(cls, task: Task) -> tuple[str, str] | None:
        """(error code, message) when a row lacks what this pipeline needs; checked unread."""
        missing = [role for role in cls.requires if role not in task.inputs]
        if missing:
            needed = " and ".join(("an " if role[0] in "aeiou" else "a ") + role for role in missing)
            return ("missing_input", f"{cls.pipeline} needs {needed} per row "
                    f"(input column {', '.join(repr(m) for m in missing)})")
        strength, steps = task.params.get("strength"), task.params["num_inference_steps"]
        if cls.takes_strength and strength is not None and int(steps * strength) < 1:
            # The pipeline would skip every step and crash on an empty list of timesteps.
            return ("invalid_value", f"strength {strength} of {steps} steps leaves no "
                    f"denoising step; raise strength or num_inference_steps")
        return None

    # The fewest frames it renders (SVD: 2; its guidance ramp needs two ends).
    min_frames: ClassVar[int] = 1
    # What the pipeline's own check_inputs demands of the sides whatever the model (LTX: 32,
    # SD: 8); the sides must be a multiple of it too.
    checked_side_multiple: ClassVar[int] = 1
    # The class ``__init__`` defaults of the config keys ``facts_from_configs`` reads, for a
    # config file that leaves one out (tests check them against the installed diffusers).
    vae_defaults: ClassVar[dict] = {"block_out_channels": (64,)}  # AutoencoderKL
    denoiser_defaults: ClassVar[dict] = {}

    @classmethod
    def shape_problem(cls, pipe, num_frames: int, height: int, width: int) -> str | None:
        """Why ``pipe`` (a loaded pipeline, or its ``ShapeFacts``) cannot render exactly this
        shape, or None when it can.

        Checked before rendering, because many pipelines do not refuse a shape they cannot
        make: they round it and the GPU time is spent on a video the frame check rejects.
        """
        facts = pipe if isinstance(pipe, ShapeFacts) else cls.facts_from_pipe(pipe)
        return facts.problem(num_frames, height, width)

    @classmethod
    def facts_from_pipe(cls, pipe) -> ShapeFacts:
        """The shape facts as the loaded pipeline computed its factors (what it will do)."""
        vae_spatial = (getattr(pipe, "vae_scale_factor_spatial", None)
                       or getattr(pipe, "vae_scale_factor", None))
        return cls.facts(getattr(pipe, "vae_scale_factor_temporal", None), vae_spatial,
                         dict(getattr(denoiser_of(pipe), "config", None) or {}))

    @classmethod
    def facts_from_configs(cls, configs: Mapping[str, Mapping]) -> ShapeFacts:
        """The same facts from the model's component configs (``vae``, ``transformer`` or
        ``unet``: their config.json), computed as the pipeline's ``__init__`` computes them.
        The UNet pipelines (ModelScope, SVD, I2VGenXL): ``2 ** (len(vae.block_out_channels)
        - 1)``, no temporal factor."""
        vae = with_defaults(configs["vae"], cls.vae_defaults)
        return cls.facts(1, 2 ** (len(vae["block_out_channels"]) - 1), cls.denoiser(configs))

    @classmethod
    def denoiser(cls, configs: Mapping[str, Mapping]) -> dict:
        return with_defaults(denoiser_config(configs), cls.denoiser_defaults)

    @classmethod
    def facts(cls, temporal: int | None, vae_spatial: int | None,
              denoiser: Mapping) -> ShapeFacts:
        """k*temporal+1 frames; sides a multiple of the VAE's downscale times the denoiser's
        patch size."""
        patch = denoiser.get("patch_size") or 1
        if isinstance(patch, (tuple, list)):
            patch = patch[-1]
        return ShapeFacts(cls.pipeline, frame_period=int(temporal or 1), frame_residues=(1,),
                          min_frames=cls.min_frames,
                          side_multiple=math.lcm(cls.checked_side_multiple,
                                                 int(vae_spatial or 1) * int(patch)))

    @classmethod
    def call_kwargs(cls, tasks: list[Task], media: list[dict], generators: list) -> dict:
        """The pipeline call for ``tasks`` (one batch key); ``media[i]`` holds task i's loaded
        inputs by role (an image: PIL RGB; a video: a list of PIL RGB frames)."""
        params = tasks[0].params
        kwargs = dict(height=params["height"], width=params["width"],
                      num_inference_steps=params["num_inference_steps"], output_type="np",
                      generator=generators if cls.generator_list else generators[0])
        if cls.takes_prompt:
            kwargs["prompt"] = [t.prompt for t in tasks]
            if cls.takes_negative_prompt and params.get("negative_prompt") is not None:
                kwargs["negative_prompt"] = [t.params["negative_prompt"] for t in tasks]
        if cls.takes_guidance:
            kwargs["guidance_scale"] = params["guidance_scale"]
        if cls.takes_num_frames:
            kwargs["num_frames"] = params["num_frames"]
        if cls.takes_strength and params.get("strength") is not None:
            kwargs["strength"] = params["strength"]
        for role in cls.requires:
            values = [m[role] for m in media]
            kwargs[role] = values if len(values) > 1 else values[0]
        return kwargs


def denoiser_of(pipe):
    """The model the sampler calls every step: a DiT's transformer or a UNet."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
