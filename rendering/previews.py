"""Small previews of a video for web pages: an animated GIF, an animated WebP, a JPEG poster.

``write_previews`` turns the exact frames that were encoded into local files; the worker stores
them next to the video and records them as artifacts. Every preview is scaled by one rule (see
``preview_size``) with one resampler (Pillow's Lanczos), so GIF, WebP and poster show the same
pixels. The GIF goes through ffmpeg (one ``split → palettegen → paletteuse`` graph: a palette
built from the whole clip, error-diffusion dithering), the WebP and the poster through Pillow.
The same frames give byte-identical files. Every failure is a ``PreviewError`` whose message is
one line.

numpy and Pillow are imported inside the functions that use them (ffmpeg runs through the light
``ffmpeg_runner``): the driver imports this module for ``PreviewSpec`` and ``check_spec`` and must
stay light.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rendering.ffmpeg_runner import FfmpegError, ffmpeg_exe, one_line, run_ffmpeg

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

PREVIEW_KINDS = ("gif", "webp", "poster")
POSTER_FRAMES = ("first", "middle", "last")
FILENAMES = {"gif": "preview.gif", "webp": "preview.webp", "poster": "poster.jpg"}
GIF_DEFAULT_FPS_CAP = 15  # a preview needs no more; every frame dropped is bytes saved
GIF_MAX_FPS = 50  # GIF delays are in 1/100 s and browsers slow anything under 2/100 s down
WEBP_QUALITY = 75  # lossy; artifacts are invisible at preview size, the file a fraction of lossless
WEBP_METHOD = 4  # libwebp's default effort, pinned so a Pillow default change cannot move bytes
# The palette branch sees colours cut to 6 bits a channel (bin centres): palettegen's cost grows
# with the number of distinct colours (millions in a noisy clip: 10x slower), and a palette this
# fine is as good; the frames that paletteuse maps and dithers keep all 8 bits.
_SIX_BITS = "'bitand(val,252)+2'"
_PALETTEGEN = (f"lutrgb=r={_SIX_BITS}:g={_SIX_BITS}:b={_SIX_BITS},"
               "palettegen=max_colors=256:stats_mode=full")
_PALETTEUSE = "paletteuse=dither=sierra2_4a"
_PARTIAL = ".partial"


class PreviewError(RuntimeError):
    """A preview could not be made. ``str(exc)`` is one line that names what failed."""


@dataclass(frozen=True)
class PreviewSpec:
    """Which previews a row gets and how they look."""

    kinds: tuple[str, ...] = ()  # any of PREVIEW_KINDS
    max_side: int = 256  # scaled down (never up) so the longer side is at most this
    gif_fps: int | None = None  # None: the video's, capped at GIF_DEFAULT_FPS_CAP; never above it
    poster_frame: str | int = "middle"  # "first" | "middle" | "last" | a frame index (negative ok)
    poster_quality: int = 85  # JPEG quality, 1..95
    timeout_s: float = 120.0  # for the ffmpeg that writes the GIF


def extension(kind: str) -> str:
    """The file extension a preview kind is stored with, so artifact names say their format."""
    if kind == "poster":
        return "jpg"
    if kind in PREVIEW_KINDS:
        return kind
    raise PreviewError(f"unknown preview kind {kind!r}; expected one of {', '.join(PREVIEW_KINDS)}")


def check_spec(spec: PreviewSpec) -> None:
    """Refuse a spec that cannot work, so a bad config fails before any row renders."""
    seen: set[str] = set()
    for kind in spec.kinds:
        extension(kind)
        if kind in seen:
            raise PreviewError(f"preview kind {kind!r} is listed twice")
        seen.add(kind)
    if not _is_int(spec.max_side) or spec.max_side < 2:
        raise PreviewError(f"previews max_side must be an integer >= 2, got {spec.max_side!r}")
    gif_fps = spec.gif_fps
    if gif_fps is not None and (not _is_int(gif_fps) or not 1 <= gif_fps <= GIF_MAX_FPS):
        raise PreviewError(f"previews gif_fps must be an integer in 1..{GIF_MAX_FPS} or unset, "
                           f"got {spec.gif_fps!r}")
    frame = spec.poster_frame
    if not (frame in POSTER_FRAMES if isinstance(frame, str) else _is_int(frame)):
        raise PreviewError(f"previews poster_frame must be one of {', '.join(POSTER_FRAMES)} or a "
                           f"frame index, got {frame!r}")
    if not _is_int(spec.poster_quality) or not 1 <= spec.poster_quality <= 95:
        raise PreviewError(f"previews poster_quality must be an integer in 1..95, "
                           f"got {spec.poster_quality!r}")
    if isinstance(spec.timeout_s, bool) or not isinstance(spec.timeout_s, numbers.Real) \
            or not spec.timeout_s > 0:
        raise PreviewError(f"previews timeout_s must be a positive number, got {spec.timeout_s!r}")


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The (width, height) previews of a ``width``x``height`` video get: scaled down, never up.

    The longer side becomes at most ``max_side``, the aspect is kept to the rounding, and a scaled
    side is rounded down to even (at least 2, never above the source), as video players like.
    A video already small enough keeps its exact size, so its pixels are not resampled at all.
    """
    longest = max(width, height)
    if longest <= max_side:
        return width, height

    def side(source: int) -> int:
        scaled = (2 * source * max_side + longest) // (2 * longest)  # round half up, in integers
        return min(source, max(2, scaled - scaled % 2))

    return side(width), side(height)


def poster_index(num_frames: int, choice: str | int) -> int:
    """The frame the poster shows, as an index into ``num_frames`` frames."""
    if choice == "first":
        return 0
    if choice == "middle":
        return num_frames // 2
    if choice == "last":
        return num_frames - 1
    if isinstance(choice, str) or not _is_int(choice):
        raise PreviewError(f"poster_frame must be one of {', '.join(POSTER_FRAMES)} or an index, "
                           f"got {choice!r}")
    if not -num_frames <= choice < num_frames:
        raise PreviewError(f"poster_frame {choice} is out of range for {num_frames} frames")
    return int(choice) % num_frames


def gif_frame_rate(video_fps: int, gif_fps: int | None) -> int:
    """The GIF's frame rate: the asked one, else the video's capped; never above the video's."""
    wanted = gif_fps if gif_fps is not None else GIF_DEFAULT_FPS_CAP
    return max(1, min(int(video_fps), int(wanted), GIF_MAX_FPS))


def gif_frame_indices(num_frames: int, video_fps: int, gif_fps: int) -> list[int]:
    """Which frames a GIF at ``gif_fps`` keeps: evenly spaced, so it lasts as long as the video."""
    if gif_fps >= video_fps:
        return list(range(num_frames))
    count = max(1, math.ceil(num_frames * gif_fps / video_fps))
    return [min(num_frames - 1, k * video_fps // gif_fps) for k in range(count)]


def frame_durations_ms(num_frames: int, fps: int) -> list[int]:
    """Per-frame display times in whole ms that add up to the true duration (no drift)."""
    stamps = [(2000 * k + fps) // (2 * fps) for k in range(num_frames + 1)]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def gif_argv(exe: str, path: str, width: int, height: int, fps: int) -> list[str]:
    """The ffmpeg command line that reads raw RGB frames on stdin and writes a looping GIF.

    One graph does it all: ``split`` feeds the frames both to ``palettegen`` (one 256-colour palette
    from every pixel of the clip, colours binned to 6 bits first for speed) and, once that palette
    is final, to ``paletteuse`` (Sierra-lite error diffusion: the least banding on gradients). The
    bitexact flags and ``-map_metadata -1`` keep encoder strings and metadata out, so the bytes
    depend on the frames alone.
    """
    graph = f"[0:v]split[a][b];[a]{_PALETTEGEN}[p];[b][p]{_PALETTEUSE}[out]"
    return [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", str(fps), "-i", "pipe:",
            "-filter_complex", graph, "-map", "[out]",
            "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
            "-loop", "0", "-f", "gif", path]


def write_previews(frames: np.ndarray, fps: int, spec: PreviewSpec, folder: str) -> dict[str, str]:
    """Write the previews ``spec`` asks for into ``folder``; return ``{kind: local path}``.

    ``frames`` is uint8 (F, H, W, 3): the exact pixels that were encoded, at ``fps``. Each file is
    written under a temporary name and renamed when complete, so a path returned is a whole file.
    """
    check_spec(spec)
    _check_frames(frames, fps)
    if not spec.kinds:
        return {}
    num_frames, height, width, _ = frames.shape
    scaled = _Scaled(frames, preview_size(width, height, spec.max_side))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise PreviewError(f"cannot create preview folder {folder}: {one_line(str(exc))}") from exc
    written: dict[str, str] = {}
    for kind in spec.kinds:
        path = os.path.join(folder, FILENAMES[kind])
        partial = path + _PARTIAL
        try:
            if kind == "gif":
                rate = gif_frame_rate(fps, spec.gif_fps)
                chosen = gif_frame_indices(num_frames, int(fps), rate)
                _write_gif(scaled.array(chosen), rate, partial, spec.timeout_s)
            elif kind == "webp":
                _write_webp(scaled.images(range(num_frames)), int(fps), partial)
            else:
                index = poster_index(num_frames, spec.poster_frame)
                _write_poster(scaled.images([index])[0], spec.poster_quality, partial)
            os.replace(partial, path)
        except BaseException as exc:
            _remove(partial)
            if isinstance(exc, OSError):
                raise PreviewError(f"{kind}: cannot write {path}: {one_line(str(exc))}") from exc
            raise
        written[kind] = path
    return written


def _check_frames(frames: object, fps: object) -> None:
    """Refuse input that is not what an encoder was fed, with a message that says how."""
    import numpy as np

    if not isinstance(frames, np.ndarray):
        raise PreviewError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise PreviewError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise PreviewError(f"frames must be shaped (F, H, W, 3) with F, H, W >= 1, "
                           f"got {tuple(frames.shape)}")
    if not _is_int(fps) or fps < 1:
        raise PreviewError(f"fps must be a positive integer, got {fps!r}")


class _Scaled:
    """The frames at preview size, each resized at most once however many previews use it."""

    def __init__(self, frames: np.ndarray, size: tuple[int, int]) -> None:
        self.frames = frames
        self.size = size
        self.same = size == (frames.shape[2], frames.shape[1])
        self._cache: dict[int, Image.Image] = {}

    def images(self, indices) -> list[Image.Image]:
        """The chosen frames as Pillow images (Lanczos; untouched when already at size)."""
        import numpy as np
        from PIL import Image

        out = []
        for index in indices:
            image = self._cache.get(index)
            if image is None:
                image = Image.fromarray(np.ascontiguousarray(self.frames[index]))
                if not self.same:
                    image = image.resize(self.size, Image.Resampling.LANCZOS)
                self._cache[index] = image
            out.append(image)
        return out

    def array(self, indices) -> np.ndarray:
        """The chosen frames as one contiguous (F, h, w, 3) uint8 array, for ffmpeg's stdin."""
        import numpy as np

        if self.same:
            return np.ascontiguousarray(self.frames[list(indices)])
        return np.stack([np.asarray(image) for image in self.images(indices)])


def _write_gif(frames: np.ndarray, fps: int, path: str, timeout_s: float) -> None:
    """Run ffmpeg's palette graph over ``frames`` and check a GIF with every frame came out."""
    num_frames, height, width, _ = frames.shape
    argv = gif_argv(ffmpeg_exe(), path, width, height, fps)
    try:
        run_ffmpeg(argv, frames.tobytes(), timeout_s=timeout_s)
    except FfmpegError as exc:
        raise PreviewError(f"gif: {exc}") from exc
    written = _count_gif_frames(path)
    if written != num_frames:
        raise PreviewError(f"gif: ffmpeg wrote {written} frames, expected {num_frames}")


def _count_gif_frames(path: str) -> int:
    """How many frames the GIF at ``path`` holds (Pillow walks the blocks, decoding none)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "GIF":
                raise PreviewError(f"gif: ffmpeg wrote {image.format}, not GIF")
            return image.n_frames
    except (OSError, SyntaxError, ValueError) as exc:
        raise PreviewError(f"gif: ffmpeg wrote an unreadable GIF: {one_line(str(exc))}") from exc


def _write_webp(images: list[Image.Image], fps: int, path: str) -> None:
    """An animated lossy WebP that loops forever, each frame held for its share of the duration."""
    from PIL import features

    # Pillow >= 11 has animation wherever it has WebP (the old "webp_anim" feature is gone).
    if not features.check_module("webp"):
        raise PreviewError("webp: this Pillow was built without WebP support")
    try:
        images[0].save(path, format="WEBP", save_all=True, append_images=images[1:],
                       duration=frame_durations_ms(len(images), fps), loop=0,
                       lossless=False, quality=WEBP_QUALITY, method=WEBP_METHOD)
    except (OSError, ValueError) as exc:
        raise PreviewError(f"webp: Pillow cannot write it: {one_line(str(exc))}") from exc


def _write_poster(image: Image.Image, quality: int, path: str) -> None:
    """A baseline JPEG of one frame, Huffman tables optimised (smaller, same pixels)."""
    try:
        image.save(path, format="JPEG", quality=quality, optimize=True)
    except (OSError, ValueError) as exc:
        raise PreviewError(f"poster: Pillow cannot write it: {one_line(str(exc))}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
