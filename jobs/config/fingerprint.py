"""The output's fingerprint: the settings that decide what every video looks like, so a
resume into an output made otherwise is refused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobs.config.job import JobConfig
from jobs.config.stages import StageConfig
from rendering.text import prompts as text_prompts


# The sections whose values change what a video looks like: a resumed output must match them.
OUTPUT_SECTIONS = ("model", "render", "optimize", "encode", "quality")
# Settings within those sections that change speed, not pixels.
_NOT_FINGERPRINTED = {"render": {"batch_size"}, "quality": {"dedup"}}
# Settings added after format 1, left out of the fingerprint at the value that behaves as
# reelfarm did before them, so outputs made before they existed resume.
_FINGERPRINTED_UNLESS = {"quality.on_unsafe": "keep", "quality.aesthetic_model": None,
                         "quality.aesthetic_revision": None, "quality.static_threshold": 0.2,
                         "quality.rules": []}
# Settings elsewhere that change what the output holds: the carried columns are manifest
# columns, and shards with other columns would not read back as one table.
_ALSO_FINGERPRINTED = (("input", "carry_columns"),)


def fingerprint_fields(cfg: JobConfig) -> dict[str, Any]:
    """The flattened settings that decide what every video looks like: with stages, every
    stage's model, fixed render settings and optimize options, under its name and in order (a
    keyframe made for one video model is not silently reused for another)."""
    fields = {}
    for section in OUTPUT_SECTIONS:
        values = getattr(cfg, section)
        if values is None:  # model, in a multi-stage job
            continue
        skip = _NOT_FINGERPRINTED.get(section, set())
        for key, value in values.model_dump().items():
            name = f"{section}.{key}"
            if key not in skip and _FINGERPRINTED_UNLESS.get(name, object()) != value:
                fields[name] = value
    for i, stage in enumerate(cfg.stages or []):
        optimize = stage.optimize or cfg.optimize
        for section, values in (("model", stage.model.model_dump()),
                                ("render", stage.render.overrides()),
                                ("optimize", optimize.model_dump()), ("text", _text_fields(stage))):
            for key, value in values.items():
                fields[f"stages.{i}.{stage.name}.{section}.{key}"] = value
    for section, key in _ALSO_FINGERPRINTED:
        fields[f"{section}.{key}"] = getattr(getattr(cfg, section), key)
    return fields


def _text_fields(stage: StageConfig) -> dict[str, Any]:
    """A text stage's settings that change what it writes, the system prompt's text by its
    sha256 (a file edited since is a change); its batch size and cache are speed only. The
    engine counts unless it is transformers, the one before there was a choice (outputs made
    then resume)."""
    if stage.text is None:
        return {}
    values = stage.text.model_dump(exclude={"batch_size", "cache_uri"} |
                                   ({"engine"} if stage.text.engine == "transformers" else set()))
    values["system_prompt_sha256"] = text_prompts.sha256(stage.text.system_prompt_text())
    return values


def fingerprint(cfg: JobConfig) -> str:
    canonical = json.dumps(fingerprint_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
