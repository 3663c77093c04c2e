"""Which video shapes a model renders exactly: its shape facts, and the one rule over them.

A pipeline's shape rule comes down to a few numbers (``ShapeFacts``): how frame counts must
fall (modulo the VAE's temporal factor, or twice it), the multiple its sides must be, the
fewest frames, and a size some transformers are bound to. Each adapter reads them in two ways:
from a loaded pipeline (``facts_from_pipe``: what the worker checks before rendering) and from
the model's JSON config files (``facts_from_configs``: what ``reelfarm plan`` checks, without
torch). Both feed the same rule, ``ShapeFacts.problem``.

This module imports neither torch nor diffusers, and nothing of the registry above it: it
reads a model's config files (``read_configs``, from a local or fsspec diffusers folder, or a
hub id already in this machine's hub cache) and never loads weights or asks the network. Which
files and which adapter a model path means is the registry's lookup
(``rendering.pipelines.known_shapes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import count
from typing import Callable, Mapping

# The components whose configs decide shapes: the VAE and the denoiser (a DiT or a UNet).
SHAPE_COMPONENTS = ("vae", "transformer", "unet")


@dataclass(frozen=True)
class ShapeFacts:
    """The numbers a pipeline's shape rule needs, and the rule (``problem``)."""

    pipeline: str  # the diffusers pipeline class, for messages
    # A frame count renders exactly when it is at least min_frames and, modulo frame_period,
    # one of frame_residues (period 1: any count). 4k+1 frames: period 4, residues (1,).
    frame_period: int = 1
    frame_residues: tuple[int, ...] = (1,)
    min_frames: int = 1
    side_multiple: int = 1  # height and width must divide by it
    only_size: tuple[int, int] | None = None  # (height, width): learned positional embeddings
    max_size: tuple[int, int] | None = None  # (height, width): what rotary embeddings span

    def exact_frames(self, n: int) -> bool:
        return n >= max(1, self.min_frames) and (
            self.frame_period <= 1 or n % self.frame_period in self.frame_residues)

    def problem(self, num_frames: int, height: int, width: int) -> str | None:
        """Why this shape would not render exactly, naming the nearest shapes that would; None
        when it would."""
        name = self.pipeline
        if num_frames < self.min_frames:
            return (f"{name} renders at least {self.min_frames} frames; num_frames={num_frames} "
                    f"is too few (nearest: {self.min_frames})")
        if not self.exact_frames(num_frames):
            period = self.frame_period
            below = next((n for n in range(num_frames - 1, max(0, num_frames - 1 - period), -1)
                          if self.exact_frames(n)), None)
            above = next(n for n in count(num_frames + 1) if self.exact_frames(n))
            rule = " or ".join(f"{period}k+{r}" if r else f"{period}k"
                               for r in self.frame_residues)
            return (f"{name} renders {rule} frames; num_frames={num_frames} is not one "
                    f"({nearest(below or above, above)})")
        multiple = self.side_multiple
        if height % multiple or width % multiple:
            return (f"{name} needs height and width divisible by {multiple}; {height}x{width} "
                    f"is not (nearest: {_round(height, multiple)}x{_round(width, multiple)})")
        if self.only_size and (height, width) != self.only_size:
            h, w = self.only_size
            return (f"{name} renders only {h}x{w} (its transformer learned positional "
                    f"embeddings for that size); {height}x{width} is not it")
        if self.max_size and (height > self.max_size[0] or width > self.max_size[1]):
            h, w = self.max_size
            return (f"{name} renders at most {h}x{w} (its rotary embeddings span that size); "
                    f"{height}x{width} is larger")
        return None


def nearest(below: int, above: int) -> str:
    """The valid values either side of a refused one, for a message."""
    return f"{below} or {above} is" if below != above else f"{above} is"


def _round(value: int, multiple: int) -> int:
    return max(multiple, (value + multiple // 2) // multiple * multiple)  # halves round up


def with_defaults(config: Mapping | None, defaults: Mapping) -> dict:
    """A component's config as diffusers would build it: a key the file leaves out takes the
    class's ``__init__`` default (the adapters declare the few defaults their rule reads)."""
    return {**defaults, **(config or {})}


def denoiser_config(configs: Mapping[str, Mapping]) -> Mapping:
    """The denoiser's config among a model's component configs: its transformer or UNet."""
    return configs.get("transformer") or configs.get("unet") or {}


@dataclass(frozen=True)
class ModelConfigs:
    """A model's pipeline class (as ``model_index.json`` names it) and its components' configs."""

    pipeline: str
    components: Mapping[str, Mapping]  # "vae", "transformer" or "unet": its config.json


class ConfigsUnknown(Exception):
    """The model's config files cannot be read here; the message says why."""


def read_configs(read: Callable[[str], bytes | None], where: str) -> ModelConfigs:
    """``model_index.json`` and the shape components' ``config.json`` through ``read`` (a
    relative path to its bytes, or None when there is no such file)."""
    index = _json(read, "model_index.json", where)
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ConfigsUnknown(f"{where}/model_index.json names no pipeline class")
    components = {}
    for name in SHAPE_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, (list, tuple)) and entry and entry[0] is not None:
            config = _json(read, f"{name}/config.json", where)
            if not isinstance(config, dict):
                raise ConfigsUnknown(f"{where}/{name}/config.json is not a JSON object")
            components[name] = config
    return ModelConfigs(index["_class_name"], components)


def _json(read: Callable[[str], bytes | None], name: str, where: str):
    try:
        data = read(name)
    except Exception as exc:  # noqa: BLE001 - any storage trouble: the rules stay unknown
        raise ConfigsUnknown(f"cannot read {where}/{name} ({type(exc).__name__}: {exc})") from None
    if data is None:
        raise ConfigsUnknown(f"{where} has no {name}")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ConfigsUnknown(f"{where}/{name} is not valid JSON ({exc})") from None


def folder_configs(uri: str) -> ModelConfigs:
    """From a diffusers folder on local disk or any fsspec URL."""
    from rendering import storage

    fs, root = storage.filesystem(uri)

    def read(name: str) -> bytes | None:
        try:
            return fs.cat_file(storage.join(root, name))
        except FileNotFoundError:
            return None

    return read_configs(read, uri.rstrip("/"))


def hub_cache_configs(repo_id: str, revision: str | None) -> ModelConfigs:
    """From huggingface_hub's cache on this machine, never the network."""
    from huggingface_hub import try_to_load_from_cache

    def read(name: str) -> bytes | None:
        path = try_to_load_from_cache(repo_id, name, revision=revision)
        if not isinstance(path, str):  # None (not cached) or "known not to exist"
            return None
        with open(path, "rb") as f:
            return f.read()

    try:
        if read("model_index.json") is None:
            raise ConfigsUnknown(f"{repo_id} is not a local folder, and not in this machine's "
                                 f"hub cache")
    except ValueError as exc:  # not a valid repo id
        raise ConfigsUnknown(f"{repo_id} is not a local folder or a hub id ({exc})") from None
    return read_configs(read, f"{repo_id} (hub cache)")
