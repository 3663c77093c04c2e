"""From one input row to a fully resolved render task, or to the reason it cannot be rendered.

Pure functions: ids, seeds, output keys and validation depend only on the row and the config,
so every run over the same input agrees on them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from jobs import params as P
from jobs.config import JobConfig
from jobs.input.media import media_identity, media_inputs
from rendering.contract import Task

STRING_COLUMNS = ("prompt", "negative_prompt", "id")  # read as bytes when not valid UTF-8
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
    stage: str | None = None  # the stage that would refuse it (None: the row itself is invalid)


def content_id(row: dict) -> str:
    """The id of a row without an ``id`` column: a hash of what it would render, its
    conditioning media's identity included (same prompt, other image: another row)."""
    content = {k: row.get(k) for k in ("prompt", *P.NAMES) if row.get(k) is not None}
    content.update(media_identity(row))
    canonical = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
    return "h" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable seed from the job seed and the row id."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % P.SEED_LIMIT


def variant_id(row_id: str, k: int) -> str:
    """The id of variation ``k`` of an input row (a text stage's ``variations``): distinct for
    distinct (id, k), as the suffix ``.v<k>`` is read from the right."""
    return f"{row_id}.v{k}"


def variant_row(row: dict, variant: str) -> dict:
    """An input row as its variation ``variant`` (an id from ``variant_id``) resolves it: a seed
    of its own is hashed with the variation's id, so variations never share one (without one,
    the seed is hashed from the job seed and that id, as for any row)."""
    seed = P.from_row(row, "seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < P.SEED_LIMIT:
        return {**row, "seed": row_seed(seed, variant)}
    return row


def output_key(row_id: str) -> str:
    """An object name for a row's video that no id can turn into a path or an option.

    Only [A-Za-z0-9._-] survive, the result never starts with '.' or '-', and a hash of the
    full id keeps distinct ids distinct however they were cleaned.
    """
    stem = _KEY_CHARS.sub("_", row_id).lstrip(".-_")[:_KEY_STEM_CHARS].rstrip(".")
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}" if stem else digest


def resolve(row: dict, row_id: str, cfg: JobConfig) -> Task | RowFailure:
    """Apply the config's defaults to a row and check every value and input."""
    values = {}
    for param in P.PARAMS:
        own = P.from_row(row, param.name)
        values[param.name] = param.default_of(cfg) if own is None else own
    if values["seed"] is None:
        values["seed"] = row_seed(cfg.render.seed, row_id)
    values["negative_prompt"] = decoded(values["negative_prompt"])

    def fail(code: str, message: str) -> RowFailure:
        return RowFailure(row_id, code, f"{code}: {message}", _readable(values))

    limits = cfg.limits
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
    for param in P.PARAMS:
        value = values[param.name]
        problem = None if value is None else P.value_problem(param, value, cfg)
        if problem:
            return fail("invalid_value", problem)
    inputs = media_inputs(row, cfg)
    if isinstance(inputs, str):
        return fail("invalid_media", inputs)
    seed = values.pop("seed")
    for param in P.PARAMS:
        if param.kind is float and values.get(param.name) is not None:
            values[param.name] = float(values[param.name])
    return Task(id=row_id, key=output_key(row_id), seed=seed, prompt=prompt, params=values,
                inputs=inputs, batch_key=P.batch_key(values))


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


def _readable(values: dict) -> dict:
    """Keep only values the manifest's typed columns can hold."""
    out = {}
    for key, value in values.items():
        param = P.BY_NAME[key]
        if param.kind is str:
            ok = isinstance(value, str)
        elif param.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            limit = P.SEED_LIMIT if key == "seed" else INT32_LIMIT
            ok = isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit
        out[key] = value if ok or value is None else None
    return out
