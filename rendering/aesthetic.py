"""Aesthetic scores: a small MLP head over CLIP's image embedding, as LAION's predictor.

LAION's improved aesthetic predictor (the one Open-Sora and cosmos-curate use) is a stack of
linear layers over the unit-length CLIP ViT-L/14 image embedding, trained to predict a 1-10
rating (5.5 reads "fair", 6.5 "high"). reelfarm loads such a head from a folder (local, a hub id
or a URL) holding:

- one ``*.safetensors`` file of linear layers named ``<prefix>.<n>.weight`` (out, in) and
  ``<prefix>.<n>.bias`` (out), applied in the order of ``n`` (so LAION's ``layers.0``,
  ``layers.2``, ... ``layers.7`` converted from its ``.pth`` load as they are); the first takes
  the CLIP model's embedding size, the last gives one number;
- ``config.json`` with ``"activation"``: what runs between layers, ``identity``
  (LAION's head has none: its dropouts are inactive at inference), ``relu`` or ``gelu``.

A video's ``aesthetic_score`` is the mean of the head over its first, middle (``F // 2``) and
last frames (each frame once: fewer for videos of under three frames), as Open-Sora samples
them. ``tiny:aesthetic`` is a seeded random head built in code for tests: its scores mean nothing.
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch

from rendering import model_cache
from rendering.model_cache import ModelCacheError

TINY_AESTHETIC = "tiny:aesthetic"
ACTIVATIONS = {"identity": lambda x: x, "relu": torch.relu, "gelu": torch.nn.functional.gelu}
_LAYER = re.compile(r"^(?:.*\.)?(\d+)\.(weight|bias)$")
_TINY_SIZES = (16, 8)  # the tiny head's hidden layers
_WEIGHT_SEED = 0
_HUB_FILES = ["*.json", "*.safetensors"]


class AestheticHead:
    """Linear layers (weight, bias) and the activation between them, on one device."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], activation: str = "identity"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"aesthetic head activation {activation!r}: choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        for (w, _), (following, _) in zip(layers, layers[1:]):
            if following.shape[1] != w.shape[0]:
                raise ValueError(f"aesthetic head layers do not chain: {tuple(w.shape)} then "
                                 f"{tuple(following.shape)}")
        if not layers or layers[-1][0].shape[0] != 1:
            raise ValueError("an aesthetic head must end in a layer with one output")
        self.layers = layers
        self.activation = activation

    @property
    def input_size(self) -> int:
        return int(self.layers[0][0].shape[1])

    def to(self, device: torch.device) -> "AestheticHead":
        return AestheticHead([(w.to(device), b.to(device)) for w, b in self.layers],
                             self.activation)

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The head's score (N,) of unit-length embeddings (N, D), in float32."""
        x = embeddings.float()
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1:
                x = ACTIVATIONS[self.activation](x)
        return x[:, 0]


def score_frames(count: int) -> list[int]:
    """The frames a video of ``count`` frames is scored on: first, middle, last, each once."""
    return sorted({0, count // 2, count - 1})


def load_head(model: str, revision: str | None, input_size: int) -> AestheticHead:
    """The head at ``model`` (tiny:aesthetic, a local folder, URL or hub id), checked to take
    embeddings of ``input_size`` (the CLIP model's projection size)."""
    if model == TINY_AESTHETIC:
        head = AestheticHead(_tiny_layers(input_size))
    elif model.startswith("tiny:"):
        raise ValueError(f"unknown tiny aesthetic model {model!r}: the only one is {TINY_AESTHETIC}")
    else:
        folder = model_cache.resolve_folder(model, revision, functools.partial(_download, model,
                                                                               revision),
                                            marker="config.json", key="quality.aesthetic_model")
        head = read_head(folder)
    if head.input_size != input_size:
        raise ValueError(f"aesthetic model {model!r} takes embeddings of size {head.input_size}, "
                         f"but the CLIP model gives {input_size}: use a head trained on it")
    return head


def read_head(folder: str) -> AestheticHead:
    """The head stored in ``folder`` (see the module docstring); safetensors only."""
    from safetensors.torch import load_file

    weights = [n for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")]
    if len(weights) != 1:
        raise ModelCacheError(f"aesthetic model folder {folder} must hold one .safetensors file, "
                              f"found {len(weights)}")
    tensors = load_file(os.path.join(folder, weights[0]))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        if match is None:
            raise ValueError(f"aesthetic head tensor {name!r} is not <prefix>.<n>.weight or .bias")
        layers.setdefault(int(match[1]), {})[match[2]] = tensor.float()
    if any(set(parts) != {"weight", "bias"} for parts in layers.values()):
        raise ValueError("every aesthetic head layer needs a weight and a bias")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ModelCacheError(f"aesthetic model folder {folder} has no config.json") from None
    return AestheticHead([(layers[n]["weight"], layers[n]["bias"]) for n in sorted(layers)],
                         config.get("activation", "identity"))


def _tiny_layers(input_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random head: ``input_size`` -> 16 -> 8 -> 1."""
    sizes = (input_size, *_TINY_SIZES, 1)
    generator = torch.Generator().manual_seed(_WEIGHT_SEED)
    return [(torch.randn(out, inp, generator=generator) / inp ** 0.5,
             torch.randn(out, generator=generator)) for inp, out in zip(sizes, sizes[1:])]


def save_tiny_head(directory: str, input_size: int) -> None:
    """Write ``tiny:aesthetic`` as a head folder (safetensors and config.json)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for n, (weight, bias) in enumerate(_tiny_layers(input_size)):
        tensors[f"layers.{2 * n}.weight"], tensors[f"layers.{2 * n}.bias"] = weight, bias
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"activation": "identity"}, f)


def _download(model: str, revision: str | None, local_files_only: bool) -> str:
    """A head's safetensors and config in the hub cache."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, allow_patterns=_HUB_FILES,
                             local_files_only=local_files_only)
