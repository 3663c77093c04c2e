"""Pipeline families: every adapter, detection by pipeline class, and every tiny twin.

Each family module declares ``ADAPTERS`` (one per diffusers pipeline class it drives), ``TINY``
(tiny random-weight twins by kind, built offline) and ``TINY_CONFIGS`` (each twin's pipeline
class and the VAE and denoiser configs its builder uses: shape facts without torch). Adding a
family is adding its module to ``FAMILIES``. Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from rendering.pipelines import cogvideox, i2vgenxl, ltx, modelscope, svd, text_to_image, wan
from rendering.pipelines.base import Adapter

FAMILIES = (modelscope, wan, cogvideox, ltx, svd, i2vgenxl, text_to_image)
ADAPTERS: dict[str, type[Adapter]] = {a.pipeline: a for f in FAMILIES for a in f.ADAPTERS}
TINY_BUILDERS = {kind: build for f in FAMILIES for kind, build in f.TINY.items()}
# kind -> (pipeline class, {"vae": config, "transformer" or "unet": config})
TINY_CONFIGS = {kind: configs for f in FAMILIES for kind, configs in f.TINY_CONFIGS.items()}
assert TINY_CONFIGS.keys() == TINY_BUILDERS.keys(), "every tiny kind declares its configs"


class UnsupportedPipeline(ValueError):
    """The model loads as a pipeline class no adapter drives."""


def adapter_named(name: str) -> type[Adapter]:
    """The adapter of the pipeline class ``name``, or a refusal naming the supported ones."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise UnsupportedPipeline(f"{name} is not a pipeline reelfarm can drive; supported: "
                                  f"{', '.join(sorted(ADAPTERS))}")
    return adapter


def final_stage_problem(adapter: type[Adapter]) -> str | None:
    """Why a pipeline cannot be a job's last stage: it makes no videos (a keyframe model)."""
    if adapter.makes == "video":
        return None
    return (f"{adapter.pipeline} makes {adapter.makes}s, not videos: it can only be an earlier "
            f"stage of a job with stages: (a keyframe stage before an image-to-video one)")


def adapter_for(pipe) -> type[Adapter]:
    return adapter_named(type(pipe).__name__)
