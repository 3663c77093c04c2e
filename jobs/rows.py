"""From one input row to a fully resolved render task, or to the reason it cannot be rendered.

Pure functions: ids, seeds, output keys and validation depend only on the row and the config,
so every run over the same input agrees on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from jobs.config import MAX_FPS, JobConfig, limit_problems
from rendering.specs import RenderTask

# Per-row columns that override the config's render/encode defaults, with their kinds.
INT_COLUMNS = ("seed", "num_frames", "height", "width", "num_inference_steps", "fps")
FLOAT_COLUMNS = ("guidance_scale",)
STRING_COLUMNS = ("prompt", "negative_prompt", "id")
OVERRIDE_COLUMNS = ("negative_prompt", *INT_COLUMNS, *FLOAT_COLUMNS)
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit values; stay in the signed range
INT32_LIMIT = 2**31  # the manifest's int32 columns; a bigger bad value is dropped from the record
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Control characters (NUL, newlines, escapes) in an id would corrupt logs, terminals and CSVs.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_KEY_STEM_CHARS = 48


@dataclass(frozen=True)
class RowFailure:
    """A row rejected before rendering: it is committed as failed with this error."""

    id: str
    error_code: str
    error: str
    params: dict  # whatever of the row's parameters could be read, for the manifest


def content_id(row: dict) -> str:
    """The id of a row without an ``id`` column: a hash of what it would render."""
    content = {k: row.get(k) for k in ("prompt", *OVERRIDE_COLUMNS) if row.get(k) is not None}
    canonical = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
    return "h" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable seed from the job seed and the row id."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def output_key(row_id: str) -> str:
    """An object name for a row's video that no id can turn into a path or an option.

    Only [A-Za-z0-9._-] survive, the result never starts with '.' or '-', and a hash of the
    full id keeps distinct ids distinct however they were cleaned.
    """
    stem = _KEY_CHARS.sub("_", row_id).lstrip(".-_")[:_KEY_STEM_CHARS].rstrip(".")
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}" if stem else digest


def resolve(row: dict, row_id: str, cfg: JobConfig) -> RenderTask | RowFailure:
    """Apply the config's defaults to a row and check every value against the limits."""
    render, encode, limits = cfg.render, cfg.encode, cfg.limits
    params = {
        "negative_prompt": _value(row, "negative_prompt", render.negative_prompt),
        "seed": _value(row, "seed", None),
        "num_frames": _value(row, "num_frames", render.num_frames),
        "height": _value(row, "height", render.height),
        "width": _value(row, "width", render.width),
        "num_inference_steps": _value(row, "num_inference_steps", render.num_inference_steps),
        "guidance_scale": _value(row, "guidance_scale", render.guidance_scale),
        "fps": _value(row, "fps", encode.fps),
    }
    if params["seed"] is None:
        params["seed"] = row_seed(render.seed, row_id)

    def fail(code: str, message: str) -> RowFailure:
        return RowFailure(row_id, code, f"{code}: {message}", _readable(params))

    id_problem = _id_problem(row_id, limits.max_id_chars)
    if id_problem:
        return fail("invalid_id", id_problem)
    prompt = decoded(row.get("prompt"))
    if prompt is NOT_UTF8:
        return fail("invalid_prompt", "prompt is not valid UTF-8")
    if prompt is None or not isinstance(prompt, str) or not prompt.strip():
        return fail("invalid_prompt", "prompt is null, empty or blank")
    if len(prompt) > limits.max_prompt_chars:
        return fail("invalid_prompt",
                    f"prompt has {len(prompt)} characters, over limits.max_prompt_chars = "
                    f"{limits.max_prompt_chars}")
    negative = params["negative_prompt"] = decoded(params["negative_prompt"])
    if negative is not None and not isinstance(negative, str):
        return fail("invalid_value", "negative_prompt must be text in valid UTF-8")
    for key in INT_COLUMNS:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int):
            return fail("invalid_value", f"{key} must be an integer, got {value!r}")
    guidance = params["guidance_scale"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        return fail("invalid_value", f"guidance_scale must be a finite number, got {guidance!r}")
    if not 0 <= params["seed"] < SEED_LIMIT:
        return fail("invalid_value", f"seed {params['seed']} is outside [0, 2**63)")
    for key in ("num_frames", "height", "width", "num_inference_steps", "fps"):
        if params[key] < 1:
            return fail("invalid_value", f"{key} must be >= 1, got {params[key]}")
    if params["fps"] > MAX_FPS:
        return fail("invalid_value", f"fps {params['fps']} is over {MAX_FPS}")
    problems = limit_problems(params["num_frames"], params["height"], params["width"],
                               params["num_inference_steps"], limits)
    if problems:
        key, message = problems[0]
        return fail("invalid_value", f"{key}: {message}")
    return RenderTask(id=row_id, key=output_key(row_id), prompt=prompt, negative_prompt=negative,
                      seed=params["seed"], num_frames=params["num_frames"],
                      height=params["height"], width=params["width"],
                      num_inference_steps=params["num_inference_steps"],
                      guidance_scale=float(guidance), fps=params["fps"])


def _value(row: dict, column: str, default):
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value) and column != "guidance_scale"):
        return default
    if isinstance(value, float) and column in INT_COLUMNS and value.is_integer():
        return int(value)
    return value


NOT_UTF8 = object()  # what _decoded returns for bytes that are not UTF-8


def decoded(value):
    """Text columns may arrive as bytes (binary columns, or strings holding invalid UTF-8)."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8


def _id_problem(row_id: str, max_chars: int) -> str | None:
    if not row_id.strip():
        return "id is empty or blank"
    if len(row_id) > max_chars:
        return f"id has {len(row_id)} characters, over limits.max_id_chars = {max_chars}"
    if _CONTROL_CHARS.search(row_id):
        return "id holds control characters (NUL, newline, escape...)"
    return None


def _readable(params: dict) -> dict:
    """Keep only values the manifest's typed columns can hold."""
    out = {}
    for key, value in params.items():
        limit = SEED_LIMIT if key == "seed" else INT32_LIMIT
        ok = (isinstance(value, str) if key == "negative_prompt"
              else isinstance(value, float) if key in FLOAT_COLUMNS
              else isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit)
        out[key] = value if ok or value is None else None
    return out
