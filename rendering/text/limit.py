"""The video model's prompt limit, read by the text stage without the video model's weights:
the tokenizer its pipeline reads prompts with and how many of its tokens it keeps
(``rendering.pipelines.load.prompt_tokenizer``), so a rewrite is trimmed to what the video
model will actually read.

A tiny kind is built in memory (well under a second); a local folder, an fsspec URL (fetched
once per node into the model cache, as the video stage does) or a hub id (only
``model_index.json`` and the tokenizer folders are downloaded) is read from its
``model_index.json`` and tokenizer files.
"""

from __future__ import annotations

import functools
import json
import os
import types
from dataclasses import dataclass

from rendering import model_cache
from rendering.contract import ModelSpec
from rendering.pipelines import adapter_named, tiny
from rendering.pipelines.load import prompt_tokenizer

_TOKENIZERS = ("tokenizer", "tokenizer_2")
_HUB_FILES = ["model_index.json", *(f"{name}/*" for name in _TOKENIZERS)]


@dataclass
class PromptLimit:
    tokenizer: object
    tokens: int  # the most tokens of a prompt the video model reads

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False,
                                  verbose=False)["input_ids"])


def prompt_limit(spec: ModelSpec, tokens: int | None = None) -> PromptLimit | None:
    """The prompt limit of the video model ``spec`` (``tokens`` overrides its number), or None
    when its pipeline takes no prompt (SVD)."""
    import diffusers

    if tiny.is_tiny(spec.path):
        pipe = tiny.build_tiny_pipeline(tiny.tiny_kind(spec.path))
        cls = getattr(diffusers, adapter_named(spec.pipeline).pipeline) if spec.pipeline \
            else type(pipe)
        stand_in = types.SimpleNamespace(**{n: getattr(pipe, n, None) for n in _TOKENIZERS})
    else:
        folder = model_cache.resolve_folder(spec.path, spec.revision,
                                            functools.partial(_download, spec))
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        name = adapter_named(spec.pipeline or index.get("_class_name", "")).pipeline
        cls = getattr(diffusers, name)
        stand_in = types.SimpleNamespace(**{n: _tokenizer(folder, n, index) for n in _TOKENIZERS})
    stand_in.__call__ = cls.__call__
    found = prompt_tokenizer(stand_in)
    if found is None:
        return None
    tokenizer, limit = found
    return PromptLimit(tokenizer, tokens if tokens is not None else limit)


def _tokenizer(folder: str, name: str, index: dict):
    """The pipeline's tokenizer ``name``, if its model_index lists one."""
    entry = index.get(name)
    if not entry or entry[0] is None or not os.path.isdir(os.path.join(folder, name)):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, subfolder=name, trust_remote_code=False)


def _download(spec: ModelSpec, local_files_only: bool) -> str:
    """A pipeline's model_index.json and tokenizers in the hub cache (not its weights)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(spec.path, revision=spec.revision, allow_patterns=_HUB_FILES,
                             local_files_only=local_files_only)
