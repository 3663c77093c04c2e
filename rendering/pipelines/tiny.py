"""Tiny random-weight pipelines of every supported family (``tiny:KIND``), built offline in code.

They exercise the same diffusers code paths as the published models at a size that renders in
well under a second on a CPU, so the demo and the tests need no network and no downloaded
weights. Weights are seeded: the same kind always gives the same pipeline, so videos rendered
with it are reproducible. Each family declares its twins' builders and configs beside its
adapters; this module gathers them by kind. Importing it loads neither torch nor diffusers.
"""

from __future__ import annotations

from rendering.pipelines.families import FAMILIES
from rendering.pipelines.shapes import ModelConfigs
from rendering.pipelines.weights import quiet_progress_bars

TINY_BUILDERS = {kind: build for f in FAMILIES for kind, build in f.TINY.items()}
# kind -> (pipeline class, {"vae": config, "transformer" or "unet": config})
TINY_CONFIGS = {kind: configs for f in FAMILIES for kind, configs in f.TINY_CONFIGS.items()}
assert TINY_CONFIGS.keys() == TINY_BUILDERS.keys(), "every tiny kind declares its configs"
TINY_KINDS = tuple(TINY_BUILDERS)
TINY_PREFIX = "tiny:"
_WEIGHT_SEED = 0


def is_tiny(model_path: str) -> bool:
    return model_path.startswith(TINY_PREFIX)


def tiny_kind(model_path: str) -> str:
    kind = model_path[len(TINY_PREFIX):]
    if kind not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny model {model_path!r}: choose one of "
                         + ", ".join(TINY_PREFIX + k for k in TINY_KINDS))
    return kind


def tiny_configs(kind: str) -> ModelConfigs:
    """The pipeline class ``kind`` builds and its VAE and denoiser configs: what ``reelfarm
    plan`` reads its shape facts from, without torch."""
    pipeline, components = TINY_CONFIGS[tiny_kind(TINY_PREFIX + kind)]
    return ModelConfigs(pipeline, components)


def build_tiny_pipeline(kind: str):
    """Return a freshly built random-weight pipeline of ``kind`` (one of ``TINY_KINDS``)."""
    import torch

    builder = TINY_BUILDERS[tiny_kind(TINY_PREFIX + kind)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        pipe = builder()
    # Modules are built in training mode; from_pretrained gives eval mode, and so must this,
    # or UMT5's dropout makes every Wan video differ from call to call.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(kind: str, directory: str) -> None:
    """Write a tiny pipeline as a diffusers folder (safetensors), loadable by from_pretrained."""
    pipe = build_tiny_pipeline(kind)
    with quiet_progress_bars():
        pipe.save_pretrained(directory, safe_serialization=True)
