"""Decode a row's conditioning video: its first frames, as RGB at the row's size, with ffmpeg.

ffmpeg reads a private local copy with ``-protocol_whitelist file`` and a ``-format_whitelist``
of real containers, so a playlist can never make it open another file or the network; the
frame size is checked from the probe before decoding, decoding stops at the frames the row
needs, and the whole takes at most ``limits.media_decode_timeout_s``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rendering.contract import MediaInput, MediaSpec
from rendering.ffmpeg_runner import FfmpegError, FfmpegTimeout, ffmpeg_exe, run_ffmpeg
from rendering.media import MediaError, as_count, check_policy
from rendering.media.reader import read_into
from rendering.media.uris import media_name

if TYPE_CHECKING:
    import subprocess

    from PIL import Image

# ffmpeg demuxers a conditioning video may use: real containers that hold their media inline.
# Playlists and indirections (hls, dash, concat, image2 patterns, tee, ...) are not on it.
VIDEO_FORMATS = "mov,mp4,matroska,webm,avi,gif"
# ffmpeg may only open the local copy it is given.
VIDEO_PROTOCOLS = "file"


@dataclass(frozen=True)
class VideoInfo:
    """What the probe read of a video: enough to decode its frames upright at a checked size."""

    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    stream: int  # index of the first real video stream (cover art skipped)
    codec: str
    width: int  # as displayed, after any rotation in the stream's display matrix
    height: int


def load_video(media: MediaInput, spec: MediaSpec, num_frames: int, width: int,
               height: int) -> tuple[list["Image.Image"], str]:
    """Exactly ``num_frames`` RGB frames (the video's first ones) at ``width`` x ``height``,
    and the sha256 of the source bytes."""
    width, height = as_count(width, "width"), as_count(height, "height")
    num_frames = as_count(num_frames, "num_frames")
    check_policy(spec)
    if num_frames > spec.max_video_frames:
        raise MediaError(f"the row needs {num_frames} video frames, over limits.max_media_frames "
                         f"({spec.max_video_frames})")
    name = media_name(media)
    with tempfile.TemporaryDirectory(prefix="reelfarm-media-") as folder:
        path = os.path.join(folder, "input")  # no extension: nothing for ffmpeg to guess from
        with open(path, "wb") as f:
            digest = read_into(media, spec, f)
        info = probe_video(path, spec, name)
        frames = _decode_video(path, info, spec, name, num_frames, width, height)
    return frames, digest


def _input_args(path: str, spec: MediaSpec) -> list[str]:
    """ffmpeg input options: only the local file, only real containers, bounded frame size."""
    return ["-protocol_whitelist", VIDEO_PROTOCOLS, "-format_whitelist", VIDEO_FORMATS,
            "-max_pixels", str(int(spec.max_pixels)), "-i", "file:" + path]


_INPUT_RE = re.compile(r"^Input #0, (.+?), from ", re.M)
_STREAM_RE = re.compile(r"^\s*Stream #0:(\d+)\S*: (\w+): (.*)$", re.M)
_SIZE_RE = re.compile(r", (\d{1,6})x(\d{1,6})(?=[ ,\]]|$)")
_ROTATION_RE = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")


def probe_video(path: str, spec: MediaSpec, name: str = "the input") -> VideoInfo:
    """Read a local video's container and first video stream without decoding it for output."""
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", *_input_args(path, spec)]
    proc = _run(argv, spec, name, "probing")
    text = proc.stderr.decode("utf-8", "replace")
    container = _INPUT_RE.search(text)
    if not container:
        if "not on whitelist" in text:
            raise MediaError(f"{name} is not a video in an allowed container format (mp4/mov, "
                             "mkv/webm, avi, gif); playlists, image files and other formats are "
                             "refused")
        raise MediaError(f"{name} is not a video ffmpeg can read: {_ffmpeg_reason(text, path)}")
    streams = list(_STREAM_RE.finditer(text))
    video = [m for m in streams if m.group(2) == "Video" and "(attached pic)" not in m.group(3)]
    if not video:
        kinds = sorted({"a cover picture" if "(attached pic)" in m.group(3) else m.group(2).lower()
                        for m in streams})
        has = f"it has {' and '.join(kinds)} only" if kinds else "it has no streams"
        raise MediaError(f"{name} has no video stream ({has})")
    first = video[0]
    size = _SIZE_RE.search(first.group(3))
    if not size:
        raise MediaError(f"{name}: its video stream has no known frame size")
    width, height = int(size.group(1)), int(size.group(2))
    following = text[first.end():]
    following = following[:nxt.start()] if (nxt := re.search(r"^\s*Stream #", following, re.M)) else following
    rotation = _ROTATION_RE.search(following)
    if rotation and round(abs(float(rotation.group(1)))) % 180 == 90:
        width, height = height, width  # ffmpeg turns the frames upright when decoding
    if width < 1 or height < 1:
        raise MediaError(f"{name} has an empty frame size {width}x{height}")
    if width * height > spec.max_pixels:
        raise MediaError(f"{name} has {width}x{height} = {width * height} pixels a frame, over "
                         f"limits.max_media_pixels ({spec.max_pixels}); not decoded")
    codec = first.group(3).split(",", 1)[0].split(" ", 1)[0]
    return VideoInfo(container.group(1), int(first.group(1)), codec, width, height)


def _video_filter(policy: str, width: int, height: int) -> str:
    if policy == "fit":
        return (f"scale={width}:{height}:force_original_aspect_ratio=decrease:flags=lanczos,"
                f"format=rgb24,pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1")
    if policy == "crop":
        return (f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=lanczos,"
                f"format=rgb24,crop={width}:{height},setsar=1")
    return f"scale={width}:{height}:flags=lanczos,format=rgb24,setsar=1"


def _decode_video(path: str, info: VideoInfo, spec: MediaSpec, name: str, num_frames: int,
                  width: int, height: int) -> list["Image.Image"]:
    from PIL import Image

    if spec.resize == "error" and (info.width, info.height) != (width, height):
        raise MediaError(f"video is {info.width}x{info.height} but the row needs "
                         f"{width}x{height} (render.media_resize is 'error')")
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *_input_args(path, spec),
            "-map", f"0:{info.stream}", "-an", "-sn", "-dn", "-frames:v", str(num_frames),
            "-fps_mode", "passthrough", "-vf", _video_filter(spec.resize, width, height),
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    proc = _run(argv, spec, name, "decoding")
    frame_bytes = width * height * 3
    got = min(len(proc.stdout) // frame_bytes, num_frames)
    reason = _ffmpeg_reason(proc.stderr.decode("utf-8", "replace"), path)
    if got < num_frames:
        detail = f" (ffmpeg: {reason})" if proc.returncode != 0 else ""
        raise MediaError(f"{name} has only {got} decodable frame{'' if got == 1 else 's'} but "
                         f"the row needs {num_frames}{detail}")
    if proc.returncode != 0:
        raise MediaError(f"{name} cannot be decoded: {reason}")
    out = proc.stdout
    return [Image.frombytes("RGB", (width, height), out[i * frame_bytes:(i + 1) * frame_bytes])
            for i in range(num_frames)]


def _run(argv: list[str], spec: MediaSpec, name: str, doing: str) -> subprocess.CompletedProcess:
    """ffmpeg's finished run, whatever its exit code (the caller reads its log), or a MediaError:
    too slow is the media's fault, an ffmpeg that cannot start is not."""
    try:
        return run_ffmpeg(argv, timeout_s=spec.decode_timeout_s, check=False)
    except FfmpegTimeout:
        raise MediaError(f"{doing} {name} took longer than limits.media_decode_timeout_s "
                         f"({spec.decode_timeout_s:g} s)") from None
    except FfmpegError as exc:
        raise MediaError(f"{name}: {exc}", retryable=True) from None


def _ffmpeg_reason(stderr: str, path: str) -> str:
    """The most telling line of ffmpeg's log, without addresses or the temp file's path."""
    noise = ("Error opening input file ", "Last message repeated", "At least one output file")
    generic = ("Error opening input files: ", "Error opening input: ", "Error opening output files: ")
    reasons = []
    for line in stderr.splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line.strip())
        line = line.replace("file:" + path, "<input>").replace(path, "<input>")
        if not line or line.startswith(noise):
            continue
        for prefix in generic:
            line = line.removeprefix(prefix)
        reasons.append(line)
    return reasons[-1] if reasons else "no output"
