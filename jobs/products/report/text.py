"""Values from the data as page text: cut short, escaped, and numbers and times formatted.

Prompts, ids and errors can be any size and hold anything; the page stays small and runs
nothing from them. Everything from the data goes through ``esc`` (html.escape) or a format here.
"""

from __future__ import annotations

import html
import math
import re
from datetime import datetime, timezone

PROMPT_CHARS = 300  # prompts and errors are cut here: the page stays small at any prompt size
ERROR_CHARS = 400
ID_CHARS = 120
DASH = "\u2014"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def cut(text, limit: int):
    if not isinstance(text, str):
        return text
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return _CONTROL.sub("\ufffd", text)  # lone surrogates and control characters


def esc(value) -> str:
    """Text from the data, safe in element content and in quoted attributes."""
    if value is None:
        return ""
    return html.escape(cut(str(value), 10 * ERROR_CHARS), quote=True)


def num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def when(epoch) -> str:
    if not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
        return DASH
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return DASH
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def width_label(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"
