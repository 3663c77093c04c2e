"""Every per-row parameter, declared once.

A row may override each of these with a column of the same name; otherwise the config's
default applies. Row resolution, the input schema check, plan counting, the content id, the
manifest's columns and the batch key all read this table: adding a parameter is one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

MAX_FPS = 240
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit values; stay in the signed range
# Heights and widths must be multiples of this: every supported VAE downsamples by 8 at least.
SIDE_MULTIPLE = 8


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float or str: what a row's value must be
    arrow: pa.DataType  # its manifest column
    default: str | None = None  # config key of the default ("render.num_frames"); None: none
    limit: str | None = None  # config key of its upper bound ("limits.max_frames")
    minimum: float | None = None
    maximum: float | None = None
    # How rows differing in it batch: "value": only equal values share a pipeline call;
    # "presence": set and unset do not mix (a negative prompt list must cover every row);
    # None: it never splits a batch (the seed, the encoder's fps).
    batch: Literal["value", "presence"] | None = "value"

    def default_of(self, cfg):
        return _config_value(cfg, self.default) if self.default else None

    def limit_of(self, cfg):
        return _config_value(cfg, self.limit) if self.limit else None


PARAMS = (
    Param("negative_prompt", str, pa.string(), "render.negative_prompt", batch="presence"),
    Param("seed", int, pa.int64(), None, minimum=0, maximum=SEED_LIMIT - 1, batch=None),
    Param("num_frames", int, pa.int32(), "render.num_frames", "limits.max_frames", minimum=1),
    Param("height", int, pa.int32(), "render.height", "limits.max_height", minimum=1),
    Param("width", int, pa.int32(), "render.width", "limits.max_width", minimum=1),
    Param("num_inference_steps", int, pa.int32(), "render.num_inference_steps",
          "limits.max_inference_steps", minimum=1),
    Param("guidance_scale", float, pa.float64(), "render.guidance_scale"),
    Param("fps", int, pa.int32(), "encode.fps", minimum=1, maximum=MAX_FPS, batch=None),
    Param("strength", float, pa.float64(), "render.strength", minimum=0.0, maximum=1.0),
)
BY_NAME = {p.name: p for p in PARAMS}
NAMES = tuple(BY_NAME)
SIDES = ("height", "width")


def value_problem(param: Param, value, cfg) -> str | None:
    """Why ``value`` cannot be this parameter's value, or None. ``value`` is not None."""
    name = param.name
    if param.kind is str:
        return None if isinstance(value, str) else f"{name} must be text in valid UTF-8"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (param.kind is int and not isinstance(value, int)):
        wanted = "an integer" if param.kind is int else "a number"
        return f"{name} must be {wanted}, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if param.minimum is not None and param.maximum is not None \
            and not param.minimum <= value <= param.maximum:
        return f"{name} {value} is outside [{_shown(param.minimum)}, {_shown(param.maximum)}]"
    if param.minimum is not None and value < param.minimum:
        return f"{name} must be >= {_shown(param.minimum)}, got {value}"
    if param.maximum is not None and value > param.maximum:
        return f"{name} {value} is over {_shown(param.maximum)}"
    limit = param.limit_of(cfg)
    if limit is not None and value > limit:
        return f"{name}: {value} is over {param.limit} = {limit}"
    if name in SIDES and value % SIDE_MULTIPLE:
        return f"{name}: {value} is not a multiple of {SIDE_MULTIPLE}"
    return None


def batch_key(params: dict) -> tuple:
    """Rows with equal keys may share one pipeline call."""
    key = []
    for param in PARAMS:
        value = params.get(param.name)
        if param.batch == "value":
            key.append((param.name, value))
        elif param.batch == "presence":
            key.append((param.name, value is not None))
    return tuple(key)


def from_row(row: dict, name: str):
    """A row's own value of a parameter, or None when it leaves the default to the config.

    Integer columns written through pandas turn nulls into NaN and integers into floats; such
    values are read back as missing and as integers. A NaN in a float column is a bad value.
    """
    value = row.get(name)
    if BY_NAME[name].kind is int and isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _config_value(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _shown(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
