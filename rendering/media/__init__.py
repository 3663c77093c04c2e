"""A row's conditioning media (an image or a video), read safely: every URI in a row is hostile.

Reading goes in four steps, a module each: ``uris`` decides, without opening anything, whether a
URI lies under one of the configured media roots; ``reader`` reads the bytes through fsspec,
never beyond ``MediaSpec.max_bytes``; ``images`` decodes a still with Pillow (only common
formats, the pixel count checked from the header before any pixel is decoded); ``videos``
decodes with ffmpeg in a subprocess reading a private local copy, with a protocol whitelist of
``file`` and a whitelist of real container formats, so a playlist can never make it open the
network or another file.

Every problem with the media itself is a ``MediaError`` whose message is one line that names
the problem; it lives here with the checks both decoders share. PIL, numpy and the storage
clients are imported inside the functions that need them: the driver checks URIs with this
package and must stay light.
"""

from __future__ import annotations

import operator

from rendering.contract import MediaSpec
from rendering.ffmpeg_runner import MESSAGE_LIMIT

RESIZE_POLICIES = ("crop", "fit", "error")


class MediaError(ValueError):
    """A row's media cannot be used. ``str(exc)`` is one line that names the problem.

    ``retryable`` is True only where the media may well load on another try (a storage
    error other than not-found or permission denied, ffmpeg missing); bad media never is.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(_one_line(message))
        self.retryable = retryable


def as_count(value, what: str) -> int:
    """A positive integer (numpy integers from a Parquet row included), else MediaError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise MediaError(f"media needs a positive integer {what}, got {clip(repr(value), 40)}")
    return number


def check_policy(spec: MediaSpec) -> None:
    """Refuse an unknown ``render.media_resize`` before any byte is read."""
    if spec.resize not in RESIZE_POLICIES:
        raise MediaError(f"render.media_resize must be one of {', '.join(RESIZE_POLICIES)}, "
                         f"got {clip(str(spec.resize), 40)!r}")


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters; a cut ends with an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _one_line(message: str) -> str:
    """A message as one printable line, its start kept (where it names the problem)."""
    text = "".join(c if c.isprintable() else " " for c in str(message))
    text = " ".join(text.split())
    return clip(text, MESSAGE_LIMIT)
