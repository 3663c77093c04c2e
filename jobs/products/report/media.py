"""The gallery's media: links to a row's video, preview and keyframe, and its input image inlined.

The page works from local disk, an object store, and after the output is copied: links are
relative to the output root (where the page lives) and checked to stay under it, and an input
image, which lies outside the output, is inlined as a small thumbnail instead.
"""

from __future__ import annotations

import base64
import io
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from jobs.config import InputConfig, JobConfig, LimitsConfig
from jobs.input.media import media_roots
from rendering.contract import MediaInput, MediaSpec
from rendering.media import MediaError
from rendering.media.images import load_image

PREVIEW_ARTIFACTS = ("poster", "webp", "gif")  # shown before the video plays, best first
THUMB_PX = 128  # longest side of a row's input image, inlined beside its video in the gallery
_THUMB_THREADS = 8  # input images are read from storage: I/O bound


def media_links(row: dict) -> dict:
    """The row's video, preview and an earlier stage's keyframe (the last one: it fed the
    video) as links relative to the output root (unsafe ones dropped). ``input_image``, the
    row's own conditioning image, is filled in by ``add_input_images`` for the gallery."""
    artifacts = {a["name"]: a["path"] for a in row.get("artifacts") or [] if a}
    video = _relative_href(artifacts.get("video") or row.get("video_uri"))
    preview = next((href for href in (_relative_href(artifacts.get(name))
                                      for name in PREVIEW_ARTIFACTS) if href), None)
    keyframes = [(name, _relative_href(path)) for name, path in artifacts.items()
                 if name != "video" and name not in PREVIEW_ARTIFACTS]  # earlier stages' own
    keyframe = next(((name, href) for name, href in reversed(keyframes) if href), None)
    return {"video": video, "preview": preview, "keyframe": keyframe, "input_image": None}


def add_input_images(rows: list[dict], job: dict) -> None:
    """Give each gallery row its input image as a small inline JPEG. The image lies outside
    the output: a link would break the page's promises (no network, works when copied). It is
    read as the job's workers read it (under its media roots, within its limits, its sha256
    checked); one that cannot be read is left out."""
    wanted = [r for r in rows if r.get("input_image_uri") and r.get("input_image_sha256")]
    spec = _media_spec(job) if wanted else None
    if spec is None:
        return
    with ThreadPoolExecutor(_THUMB_THREADS) as pool:
        for row, image in zip(wanted, pool.map(lambda r: _thumbnail(r, spec), wanted)):
            row["media"]["input_image"] = image


def _media_spec(job: dict) -> MediaSpec | None:
    """How the job's workers read media, from ``job.json``; None without a usable config."""
    config = job.get("config") or {}
    try:
        section = InputConfig.model_validate(config.get("input"))
        limits = LimitsConfig.model_validate(config.get("limits") or {})
    except ValidationError:
        return None
    # Under "error" every rendered row's image had the row's shape: scaling it down to a
    # thumbnail of that shape crops nothing.
    resize = (config.get("render") or {}).get("media_resize", "crop")
    return MediaSpec(roots=media_roots(JobConfig.model_construct(input=section)),
                     resize="crop" if resize == "error" else resize,
                     max_bytes=limits.max_media_bytes, max_pixels=limits.max_media_pixels)


def _thumbnail(row: dict, spec: MediaSpec) -> str | None:
    """The row's input image as the model saw it (fitted to the row's shape), scaled down to
    ``THUMB_PX``, as a data URI; None when it cannot be read or no longer matches its sha256."""
    width, height = row.get("width") or THUMB_PX, row.get("height") or THUMB_PX
    scale = THUMB_PX / max(width, height)
    media = MediaInput(uri=row["input_image_uri"], sha256=row["input_image_sha256"])
    try:
        image, _ = load_image(media, spec, max(1, round(width * scale)),
                              max(1, round(height * scale)))
    except MediaError:
        return None
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f\\:]")


def _relative_href(path) -> str | None:
    """A link to ``path`` (relative to the output root, where the page is), or None when it is
    not a plain relative path: no scheme, no leading slash, no ``..``."""
    if not isinstance(path, str) or not path or path.startswith("/") or _UNSAFE_PATH.search(path):
        return None
    if any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return urllib.parse.quote(path, safe="/")
