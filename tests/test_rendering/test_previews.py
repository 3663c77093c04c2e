"""Previews of a rendered video: GIF, animated WebP and JPEG poster, with real ffmpeg and Pillow.

Frames are built in code; each frame has its own brightness, so a preview showing the wrong frame
is caught by its pixels, not only by its size.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from rendering import previews
from rendering.previews import (
    PREVIEW_KINDS,
    PreviewError,
    PreviewSpec,
    extension,
    preview_size,
    write_previews,
)



def clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients, a square that moves, and a brightness that rises frame by frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.float32)
    for t in range(num_frames):
        level = 40 + 170 * t / max(1, num_frames - 1)
        frames[t, ..., 0] = level + 40 * x / width
        frames[t, ..., 1] = level + 30 * y / height
        frames[t, ..., 2] = level - 30 * (x + y) / (width + height)
        top, left = (2 * t) % max(1, height // 2), (3 * t) % max(1, width // 2)
        frames[t, top:top + height // 4, left:left + width // 4] = (230, 40, 40)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def downscaled(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(frame)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32)


def decoded_frames(path: str) -> tuple[list[np.ndarray], list[int]]:
    """Every frame of an animation as RGB float arrays, and each one's display time in ms."""
    frames, durations = [], []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB"), dtype=np.float32))
            durations.append(image.info.get("duration", 0))
    return frames, durations


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def expect_error(frames, fps, spec, folder, *contains: str) -> str:
    with pytest.raises(PreviewError) as info:
        write_previews(frames, fps, spec, str(folder))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for part in contains:
        assert part.lower() in message.lower(), f"{part!r} not in {message!r}"
    return message


def test_extension_names_each_kind_by_its_format():
    assert [extension(kind) for kind in PREVIEW_KINDS] == ["gif", "webp", "jpg"]
    with pytest.raises(PreviewError, match="mp4"):
        extension("mp4")


@pytest.mark.parametrize(("width", "height", "max_side", "expected"), [
    (1280, 720, 256, (256, 144)),
    (720, 1280, 256, (144, 256)),
    (720, 480, 256, (256, 170)),  # 170.67 -> 171 -> even
    (160, 96, 64, (64, 38)),
    (128, 128, 256, (128, 128)),  # small enough: never scaled up
    (30, 22, 256, (30, 22)),
    (31, 21, 256, (31, 21)),  # kept exactly: no resampling at all
    (31, 21, 16, (16, 10)),
    (1000, 10, 256, (256, 2)),  # a thin side stays at least 2
    (1000, 1, 256, (256, 1)),  # ... but never above the source
])
def test_preview_size_scales_down_only_and_keeps_aspect(width, height, max_side, expected):
    assert preview_size(width, height, max_side) == expected


def test_gif_has_every_frame_loops_keeps_aspect_and_looks_like_the_video(tmp_path):
    frames = clip(16, 96, 160)
    paths = write_previews(frames, 8, PreviewSpec(kinds=("gif",), max_side=64), str(tmp_path))
    assert list(paths) == ["gif"] and paths["gif"] == str(tmp_path / "preview.gif")
    assert sorted(os.listdir(tmp_path)) == ["preview.gif"]  # no temp file left behind
    with Image.open(paths["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 16 and gif.is_animated
        assert gif.info["loop"] == 0  # loops forever
        assert gif.size == (64, 38)
    decoded, durations = decoded_frames(paths["gif"])
    assert abs(sum(durations) - 2000) <= 20  # 16 frames at 8 fps
    for index, image in enumerate(decoded):
        assert mean_abs_diff(image, downscaled(frames[index], (64, 38))) < 10, index


def closest_frames(decoded: list[np.ndarray], frames: np.ndarray) -> list[int]:
    """For each decoded preview frame, the index of the video frame it looks most like."""
    return [int(np.argmin([mean_abs_diff(image, frame) for frame in frames])) for image in decoded]


def test_gif_frame_rate_is_capped_and_keeps_the_duration(tmp_path):
    frames = clip(30, 32, 48)
    paths = write_previews(frames, 30, PreviewSpec(kinds=("gif",)), str(tmp_path / "default"))
    decoded, durations = decoded_frames(paths["gif"])
    assert len(decoded) == 15 and abs(sum(durations) - 1000) <= 20  # 30 fps -> 15 fps, still 1 s
    assert closest_frames(decoded, frames) == list(range(0, 30, 2))  # every other frame kept
    paths = write_previews(frames, 30, PreviewSpec(kinds=("gif",), gif_fps=4), str(tmp_path / "4"))
    decoded, durations = decoded_frames(paths["gif"])
    assert len(decoded) == 4 and abs(sum(durations) - 1000) <= 20
    assert closest_frames(decoded, frames) == [0, 7, 15, 22]  # evenly spaced in time
    # A GIF is never faster than its video: asking for more keeps every frame at the video's rate.
    spec = PreviewSpec(kinds=("gif",), gif_fps=25)
    paths = write_previews(frames[:8], 8, spec, str(tmp_path / "25"))
    decoded, durations = decoded_frames(paths["gif"])
    assert len(decoded) == 8 and abs(sum(durations) - 1000) <= 20


def test_webp_is_animated_with_every_frame_at_the_video_rate(tmp_path):
    frames = clip(16, 96, 160)
    paths = write_previews(frames, 8, PreviewSpec(kinds=("webp",), max_side=64), str(tmp_path))
    with Image.open(paths["webp"]) as webp:
        assert webp.format == "WEBP" and webp.is_animated and webp.n_frames == 16
        assert webp.size == (64, 38) and webp.info.get("loop") == 0
    decoded, durations = decoded_frames(paths["webp"])
    assert sum(durations) == 2000
    for index, image in enumerate(decoded):
        assert mean_abs_diff(image, downscaled(frames[index], (64, 38))) < 8, index


@pytest.mark.parametrize(("choice", "index"), [
    ("first", 0), ("middle", 6), ("last", 11), (3, 3), (-2, 10),
])
def test_poster_is_a_jpeg_of_the_chosen_frame(tmp_path, choice, index):
    frames = clip(12, 72, 128)
    spec = PreviewSpec(kinds=("poster",), max_side=64, poster_frame=choice)
    paths = write_previews(frames, 8, spec, str(tmp_path))
    assert paths == {"poster": str(tmp_path / "poster.jpg")}
    with Image.open(paths["poster"]) as poster:
        assert poster.format == "JPEG" and poster.size == (64, 36) and poster.mode == "RGB"
        pixels = np.asarray(poster, dtype=np.float32)
    diffs = [mean_abs_diff(pixels, downscaled(frame, (64, 36))) for frame in frames]
    assert diffs[index] < 4, diffs
    assert int(np.argmin(diffs)) == index, diffs


def test_downscaling_filters_instead_of_dropping_pixels(tmp_path):
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255  # 1-pixel black and white squares
    frames = np.repeat(checker[None, ..., None], 3, axis=3).astype(np.uint8)
    poster = write_previews(frames, 8, PreviewSpec(kinds=("poster",), max_side=32),
                            str(tmp_path))["poster"]
    with Image.open(poster) as image:
        pixels = np.asarray(image, dtype=np.float32)
    assert abs(pixels.mean() - 127.5) < 8 and pixels.std() < 16  # grey, not black or white


def test_poster_quality_is_applied(tmp_path):
    frames = clip(1, 96, 96)
    low = write_previews(frames, 8, PreviewSpec(kinds=("poster",), poster_quality=20),
                         str(tmp_path / "low"))["poster"]
    high = write_previews(frames, 8, PreviewSpec(kinds=("poster",), poster_quality=95),
                          str(tmp_path / "high"))["poster"]
    assert os.path.getsize(low) < os.path.getsize(high)


def test_the_same_frames_give_byte_identical_files(tmp_path):
    frames = clip(16, 128, 128)
    spec = PreviewSpec(kinds=PREVIEW_KINDS, max_side=96)
    first = write_previews(frames, 8, spec, str(tmp_path / "a"))
    second = write_previews(frames.copy(), 8, spec, str(tmp_path / "b"))
    assert list(first) == list(PREVIEW_KINDS)
    for kind in PREVIEW_KINDS:
        with open(first[kind], "rb") as a, open(second[kind], "rb") as b:
            assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest(), kind
    with open(first["gif"], "rb") as gif:
        assert b"Lavf" not in gif.read()  # no encoder string: bytes depend on the frames alone


@pytest.mark.parametrize(("num_frames", "height", "width"),
                         [(8, 22, 30), (1, 22, 30), (128, 24, 32), (3, 21, 31)])
def test_odd_sizes_single_frames_and_long_clips_work(tmp_path, num_frames, height, width):
    frames = clip(num_frames, height, width)
    paths = write_previews(frames, 8, PreviewSpec(kinds=PREVIEW_KINDS), str(tmp_path))
    for kind in ("gif", "webp"):
        with Image.open(paths[kind]) as image:
            assert image.size == (width, height)
            assert getattr(image, "n_frames", 1) == num_frames, kind
    with Image.open(paths["poster"]) as poster:
        assert poster.size == (width, height)


def test_non_contiguous_frames_are_taken_as_they_look(tmp_path):
    frames = clip(4, 40, 40)
    flipped = frames[:, :, ::-1]
    poster = write_previews(flipped, 8, PreviewSpec(kinds=("poster",), poster_frame="first"),
                            str(tmp_path))["poster"]
    with Image.open(poster) as image:
        assert mean_abs_diff(np.asarray(image), flipped[0]) < 4


def test_no_kinds_writes_nothing(tmp_path):
    assert write_previews(clip(2, 8, 8), 8, PreviewSpec(), str(tmp_path / "none")) == {}
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("frames", "fps", "contains"), [
    (clip(2, 16, 16).astype(np.float32) / 255, 8, ("uint8", "float32")),
    (clip(2, 16, 16)[..., 0], 8, ("(F, H, W, 3)",)),
    (np.zeros((2, 16, 16, 4), np.uint8), 8, ("(F, H, W, 3)",)),
    (np.zeros((0, 16, 16, 3), np.uint8), 8, ("(F, H, W, 3)",)),
    (clip(1, 16, 16)[0], 8, ("(F, H, W, 3)",)),
    (clip(2, 16, 16).tolist(), 8, ("numpy array",)),
    (clip(2, 16, 16), 0, ("fps",)),
    (clip(2, 16, 16), 7.5, ("fps",)),
])
def test_bad_frames_raise_one_line(tmp_path, frames, fps, contains):
    expect_error(frames, fps, PreviewSpec(kinds=PREVIEW_KINDS), tmp_path, *contains)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("spec", "contains"), [
    (PreviewSpec(kinds=("mp4",)), ("mp4",)),
    (PreviewSpec(kinds=("gif", "gif")), ("twice",)),
    (PreviewSpec(kinds=("gif",), max_side=1), ("max_side",)),
    (PreviewSpec(kinds=("gif",), gif_fps=0), ("gif_fps",)),
    (PreviewSpec(kinds=("gif",), gif_fps=60), ("gif_fps",)),
    (PreviewSpec(kinds=("poster",), poster_frame="centre"), ("poster_frame", "centre")),
    (PreviewSpec(kinds=("poster",), poster_frame=True), ("poster_frame",)),
    (PreviewSpec(kinds=("poster",), poster_frame=2), ("out of range",)),
    (PreviewSpec(kinds=("poster",), poster_frame=-3), ("out of range",)),
    (PreviewSpec(kinds=("poster",), poster_quality=100), ("poster_quality",)),
    (PreviewSpec(kinds=("gif",), timeout_s=0), ("timeout_s",)),
])
def test_bad_specs_raise_one_line(tmp_path, spec, contains):
    expect_error(clip(2, 16, 16), 8, spec, tmp_path, *contains)


def test_ffmpeg_failure_is_a_preview_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(previews, "ffmpeg_exe", lambda: "/bin/false")
    out = tmp_path / "out"
    expect_error(clip(2, 16, 16), 8, PreviewSpec(kinds=("gif",)), out, "gif", "ffmpeg exited 1")
    assert os.listdir(out) == []


def test_a_hung_ffmpeg_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setattr(previews, "ffmpeg_exe", lambda: str(hang))
    out = tmp_path / "out"
    expect_error(clip(2, 16, 16), 8, PreviewSpec(kinds=("gif",), timeout_s=0.5), out,
                 "gif", "did not finish in 0.5 s")
    assert os.listdir(out) == []


def test_gif_argv_is_one_palette_graph_with_no_shell_and_no_metadata():
    argv = previews.gif_argv("ffmpeg", "/tmp/x.gif", 64, 38, 8)
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph.index("split") < graph.index("palettegen") < graph.index("paletteuse")
    assert argv[argv.index("-i") + 1] == "pipe:" and "rawvideo" in argv and "rgb24" in argv
    assert argv[argv.index("-loop") + 1] == "0" and argv[argv.index("-map_metadata") + 1] == "-1"
    assert "+bitexact" in argv and argv[-1] == "/tmp/x.gif"


def test_importing_previews_stays_light():
    code = ("import sys, rendering.previews; "
            "sys.exit(sorted({'numpy', 'PIL', 'rendering.encode'} & set(sys.modules)) or 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
