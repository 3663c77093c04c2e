"""Encode frames to a browser-playable MP4 (H.264, yuv420p, +faststart) with ffmpeg, and a
keyframe to a PNG.

The argv is built by a pure function and run by ``ffmpeg_runner`` (no shell, stderr drained,
a deadline). Encoding goes to a local temp file because +faststart rewrites the file and needs a
seekable output.
"""

from __future__ import annotations

import re

import ffmpeg
import numpy as np

from rendering.contract import EncodeSpec
from rendering.ffmpeg_runner import ffmpeg_exe, one_line, run_ffmpeg


class EncodeError(RuntimeError):
    """The frames cannot be encoded, or the video ffmpeg wrote is not what was asked for (ffmpeg's
    own failures are ``FfmpegError``)."""


def encode_argv(exe: str, path: str, width: int, height: int, fps: int, spec: EncodeSpec) -> list[str]:
    """The ffmpeg command line that reads raw RGB frames on stdin and writes ``path``."""
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                          framerate=fps)
    stream = ffmpeg.output(stream, path, vcodec="libx264", pix_fmt="yuv420p", crf=spec.crf,
                           preset=spec.preset, movflags="+faststart", an=None)
    return ffmpeg.compile(stream, cmd=[exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"])


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (diffusers' ``output_type='np'``) to contiguous uint8 RGB."""
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    return np.ascontiguousarray(np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8))


def encode_video(frames: np.ndarray, path: str, fps: int, spec: EncodeSpec) -> None:
    """Write ``frames`` (F, H, W, 3) uint8 to ``path`` and check every frame made it."""
    num_frames, height, width, channels = frames.shape
    if channels != 3:
        raise EncodeError(f"expected RGB frames, got {channels} channels")
    if height % 2 or width % 2:
        raise EncodeError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
    run_ffmpeg(encode_argv(ffmpeg_exe(), path, width, height, fps, spec), frames.tobytes(),
               timeout_s=spec.timeout_s)
    decoded = count_frames(path)
    if decoded != num_frames:
        raise EncodeError(f"encoded video has {decoded} frames, expected {num_frames}")


def encode_image(pixels: np.ndarray, path: str) -> None:
    """Write one (H, W, 3) uint8 picture as a PNG: lossless, so the stage that animates it reads
    exactly what was rendered, and free of metadata, so the same pixels give the same bytes."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path, format="PNG", optimize=False,
                                                                compress_level=6)


_FRAME_RE = re.compile(rb"frame=\s*(\d+)")


def count_frames(path: str, timeout_s: float = 120.0) -> int:
    """Decode ``path`` fully and return how many video frames it holds."""
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "info", "-stats", "-i", path,
            "-map", "0:v:0", "-f", "null", "-"]
    proc = run_ffmpeg(argv, timeout_s=timeout_s, check=False)
    matches = _FRAME_RE.findall(proc.stderr)
    if proc.returncode != 0 or not matches:
        raise EncodeError(f"cannot decode {path}: {one_line(proc.stderr)}")
    return int(matches[-1])
