"""The pipeline registry: every adapter by pipeline class, and a model's shape facts by path.

The families (``families.FAMILIES``) declare their adapters; this module looks them up by
pipeline class and answers, from config files alone, which shapes the model at a path renders
exactly (``known_shapes``: what ``reelfarm plan`` checks). Nothing here imports torch or
diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rendering import model_cache
from rendering.pipelines import tiny
from rendering.pipelines.base import Adapter
from rendering.pipelines.families import FAMILIES
from rendering.pipelines.shapes import (ConfigsUnknown, ShapeFacts, folder_configs,
                                        hub_cache_configs)

ADAPTERS: dict[str, type[Adapter]] = {a.pipeline: a for f in FAMILIES for a in f.ADAPTERS}


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
    return adapter_named(type(pipe).__name__).for_pipe(pipe)


@dataclass(frozen=True)
class KnownShapes:
    """A model's shape facts and where they were read; ``facts`` is None when unknown, and
    ``source`` then says why. ``adapter``: its pipeline's, when the class is known."""

    facts: ShapeFacts | None
    source: str
    adapter: type[Adapter] | None = None


def known_shapes(path: str, pipeline: str | None = None,
                 revision: str | None = None) -> KnownShapes:
    """The shape facts of ``model.path`` loaded as ``model.pipeline``, from config files alone.

    ``tiny:KIND``: its declared configs; a local folder or an fsspec URL: its JSON files (a URL
    already copied into this node's model cache is read there); a hub id: only if this
    machine's hub cache holds its config files. Anything else: unknown, with the reason.
    """
    try:
        if tiny.is_tiny(path):
            configs = tiny.tiny_configs(tiny.tiny_kind(path))
            source = "the tiny model's configs"
        elif model_cache.is_url(path):
            local = model_cache.cached_path(path)
            configs = folder_configs(local if os.path.isdir(local) else path)
            source = f"its config files ({local if os.path.isdir(local) else path})"
        elif os.path.isdir(path):
            configs = folder_configs(path)
            source = "its config files"
        else:
            configs = hub_cache_configs(path, revision)
            source = "its config files in the hub cache"
    except (ConfigsUnknown, ValueError) as exc:
        return KnownShapes(None, str(exc), ADAPTERS.get(pipeline) if pipeline else None)
    name = pipeline or configs.pipeline
    adapter = ADAPTERS.get(name)
    if adapter is None:
        return KnownShapes(None, f"{name} is not a pipeline reelfarm can drive")
    try:
        facts = adapter.facts_from_configs(configs.components)
    except (KeyError, TypeError, ValueError) as exc:
        return KnownShapes(None, f"{name}'s component configs do not say ({type(exc).__name__}: "
                                 f"{exc})", adapter)
    return KnownShapes(facts, f"{name}, from {source}", adapter)
