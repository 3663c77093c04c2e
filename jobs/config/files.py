"""Reading a config: YAML files plus ``--set key=value`` overrides, relative paths resolved,
and pydantic's errors said as one line that names the key."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from jobs.config.base import ConfigError, redact
from jobs.config.job import JobConfig
from rendering import storage


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> JobConfig:
    """Read a YAML config (or start from ``base``), apply ``key=value`` overrides, validate.

    Relative local paths written in the file resolve against the file's folder, as docker
    compose does, so a config works from any directory; those given on the command line
    (overrides, --input, --output) resolve against the current directory, as shells do.
    """
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        data = _relative_to(_read_yaml(Path(path)), Path(path).parent)
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    return validate(data)


def validate(data: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(redact(_first_error(exc))) from None


def with_absolute_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its local input, output and media-root paths made absolute against this
    process's folder. The driver hands workers one absolute output: a relative one would be
    resolved in each worker's own folder and split the output between machines and folders."""
    out = cfg.model_copy(deep=True)
    out.input.uri = storage.absolute(out.input.uri)
    out.output.uri = storage.absolute(out.output.uri)
    if out.input.media_roots is not None:
        out.input.media_roots = [storage.absolute(root) for root in out.input.media_roots]
    return out



# Keys that hold local paths, and whether a bare relative value counts (a model path "org/name"
# is a hub id: only ./ and ../ make it a folder).
_PATH_KEYS = {("input", "uri"): True, ("output", "uri"): True, ("input", "media_roots"): True,
              ("model", "path"): False}


def _relative_to(data: dict, folder: Path) -> dict:
    """``data`` with the relative local paths of ``_PATH_KEYS`` joined to ``folder``."""
    def resolve(value, bare: bool):
        if not isinstance(value, str) or "://" in value or value.startswith(("/", "~", "tiny:")):
            return value
        if not bare and not value.startswith(("./", "../")):
            return value
        return os.path.abspath(os.path.join(folder, value))

    stages = data.get("stages")
    stage_models = [(stage, "model") for stage in stages if isinstance(stage, dict)] \
        if isinstance(stages, list) else []
    for stage, _ in stage_models:  # a text stage's own system prompt file, like a model folder
        text = stage.get("text")
        if isinstance(text, dict) and isinstance(text.get("system_prompt"), str):
            text["system_prompt"] = resolve(text["system_prompt"], False)
    for (section, key), bare in _PATH_KEYS.items():
        holders = [data] + ([s for s, _ in stage_models] if section == "model" else [])
        for holder in holders:
            values = holder.get(section)
            if not isinstance(values, dict) or values.get(key) is None:
                continue
            value = values[key]
            values[key] = [resolve(v, bare) for v in value] if isinstance(value, list) \
                else resolve(value, bare)
    return data


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config {path}{line} is not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. render.num_frames=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted; a stage by its name or index: ``stages.keyframe.render.height``)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # the stages
            child = next((s for s in node if isinstance(s, dict) and s.get("name") == part),
                         node[int(part)] if part.isdigit() and int(part) < len(node) else None)
            if child is None:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no stage {part!r}")
        else:
            child = node.setdefault(part, {})
        if not isinstance(child, dict) and not (isinstance(child, list) and part == "stages"):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _first_error(exc: ValidationError) -> str:
    """One line naming the key: the first problem pydantic found, in our words."""
    err = exc.errors()[0]
    loc = tuple(p for i, p in enumerate(err["loc"])  # not the reading of resources.workers
                if not (i and err["loc"][i - 1] == "workers" and p in ("count", "range")))
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = err.get("input")
    shown = "" if isinstance(got, dict) or not key else f" (got {got!r})"
    count = exc.error_count()
    more = f" [and {count - 1} more problem{'s' if count > 2 else ''}]" if count > 1 else ""
    return f"{key}: {message}{shown}{more}" if key else f"{message}{more}"


def _did_you_mean(loc: tuple) -> str:
    """``; did you mean render.num_frames?`` for an unknown key close to a key of its section."""
    section: Any = JobConfig
    for part in loc[:-1]:
        if not isinstance(part, int):  # a list index (stages.0) stays in the same model
            field = section.model_fields.get(part)
            section = _section_of(field.annotation) if field is not None else None
            if section is None:
                return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


def _section_of(annotation) -> type[BaseModel] | None:
    """The config section a field holds (``ModelConfig | None``, ``list[StageConfig]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_of, get_args(annotation))), None)
