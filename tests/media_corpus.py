"""A hostile media corpus, built in code in a temp folder: no media file is ever committed.

Each builder writes one file (or link) into ``folder`` and returns its path as a string.
Images are written with Pillow (or byte by byte where Pillow will not write the lie), videos
with the ffmpeg that reelfarm itself uses.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rendering.ffmpeg_runner import ffmpeg_exe

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


def _path(folder, name: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    """Run ffmpeg quietly and fail loudly."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *args],
                          input=stdin, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr.decode()[-500:]}")


# ----------------------------------------------------------------------------- images


def halves(size=(64, 32), left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    width, height = size
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def image_file(folder, name: str, image: Image.Image, fmt: str | None = None, **save) -> str:
    path = _path(folder, name)
    image.save(path, fmt, **save)
    return str(path)


def good_png(folder, size=(64, 32), name="good.png") -> str:
    return image_file(folder, name, halves(size), "PNG")


def good_jpeg(folder, size=(64, 32), name="good.jpg") -> str:
    return image_file(folder, name, halves(size), "JPEG", quality=95)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def truncated_png(folder) -> str:
    """A PNG cut off halfway through its pixel data."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = _path(folder, "truncated.png")
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def text_named_png(folder) -> str:
    path = _path(folder, "notes.png")
    path.write_text("this is a shopping list, not a picture\n" * 10)
    return str(path)


def eps_named_png(folder) -> str:
    """PostScript: Pillow would hand it to Ghostscript, so it must never reach a plugin."""
    path = _path(folder, "drawing.png")
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
                     b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")
    return str(path)


def animated_gif(folder, frames=3) -> str:
    images = [Image.new("RGB", (32, 32), color) for color in (RED, GREEN, BLUE)[:frames]]
    path = _path(folder, "animated.gif")
    images[0].save(path, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return str(path)


def animated_png(folder, frames=3) -> str:
    images = [Image.new("RGB", (32, 32), color) for color in (RED, GREEN, BLUE)[:frames]]
    path = _path(folder, "animated.png")
    images[0].save(path, "PNG", save_all=True, append_images=images[1:], duration=100)
    return str(path)


def png16(folder, value=40000, size=(40, 30)) -> str:
    """A 16-bit greyscale PNG (Pillow mode I;16), every pixel ``value``."""
    return image_file(folder, "grey16.png", Image.fromarray(np.full(size[::-1], value, np.uint16)), "PNG")


def cmyk_jpeg(folder, rgb=(200, 60, 20), size=(40, 30)) -> str:
    return image_file(folder, "cmyk.jpg", Image.new("RGB", size, rgb).convert("CMYK"), "JPEG",
                      quality=95)


def grey_png(folder, value=77, size=(40, 30)) -> str:
    return image_file(folder, "grey.png", Image.new("L", size, value), "PNG")


def palette_png_transparent(folder, size=(40, 30)) -> str:
    """A palette PNG: left half index 0 (white, fully transparent), right half index 1 (green)."""
    image = Image.new("P", size, 1)
    image.putpalette([255, 255, 255, *GREEN] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, size[0] // 2, size[1]))
    return image_file(folder, "palette.png", image, "PNG", transparency=0)


def rgba_png(folder, size=(40, 30)) -> str:
    """RGBA: left half white but fully transparent, right half opaque blue."""
    image = Image.new("RGBA", size, (*BLUE, 255))
    image.paste((255, 255, 255, 0), (0, 0, size[0] // 2, size[1]))
    return image_file(folder, "rgba.png", image, "PNG")


def grey_alpha_png(folder, size=(40, 30)) -> str:
    image = Image.new("LA", size, (200, 255))
    image.paste((255, 0), (0, 0, size[0] // 2, size[1]))
    return image_file(folder, "grey_alpha.png", image, "PNG")


def exif_rotated_jpeg(folder) -> str:
    """Stored 64x32 with EXIF orientation 6 (rotate 90° clockwise): upright it is 32x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_file(folder, "rotated.jpg", halves((64, 32)), "JPEG", exif=exif, quality=95)


def bomb_png(folder, width: int, height: int, name="bomb.png") -> str:
    """A bilevel all-black PNG of ``width`` x ``height`` written row by row: a few hundred KB on
    disk for hundreds of millions of pixels. Written by hand, so no full image is ever in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then packed 1-bit pixels
    compressor = zlib.compressobj(9)
    rows_at_once = max(1, (1 << 20) // len(row))
    parts = []
    for start in range(0, height, rows_at_once):
        parts.append(compressor.compress(row * min(rows_at_once, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))
    path = _path(folder, name)
    path.write_bytes(data)
    return str(path)


def oversized_png(folder, at_least: int) -> str:
    """A valid PNG of at least ``at_least`` bytes (incompressible noise)."""
    side = int((at_least / 3) ** 0.5) + 8
    noise = np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return image_file(folder, "big.png", Image.fromarray(noise), "PNG", compress_level=0)


# ----------------------------------------------------------------------------- videos


def grey_levels(frames: int) -> list[int]:
    """The grey level of each frame of ``ramp_video``: frame i is clearly brighter than i - 1."""
    return [16 + (200 * i) // max(1, frames - 1) for i in range(frames)]


def ramp_video(folder, frames=10, size=(64, 48), name="ramp.mp4", faststart=False,
               extra: tuple[str, ...] = ()) -> str:
    """An H.264 MP4 whose frame i is a flat grey of ``grey_levels(frames)[i]``."""
    width, height = size
    raw = b"".join(np.full((height, width, 3), level, np.uint8).tobytes()
                   for level in grey_levels(frames))
    path = _path(folder, name)
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "8",
           "-i", "pipe:", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "1",
           "-pix_fmt", "yuv444p", *(["-movflags", "+faststart"] if faststart else []), *extra,
           str(path), stdin=raw)
    return str(path)


def gap_video(folder, frames=10) -> str:
    """``ramp_video`` with variable timing: a two-second pause after frame 1. Decoded at a
    constant rate, frame 1 would be repeated to fill the pause."""
    return ramp_video(folder, frames, name="gap.mp4",
                      extra=("-vf", r"setpts=N/(8*TB)+gte(N\,2)*2/TB", "-fps_mode", "vfr"))


def gif_video(folder, frames=6) -> str:
    path = _path(folder, "clip.gif")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", str(frames), str(path))
    return str(path)


def rotated_video(folder, source: str) -> str:
    """``source`` with a display matrix saying "turn 90°": shown upright it is taller than wide."""
    path = _path(folder, "rotated.mp4")
    ffmpeg("-display_rotation", "90", "-i", source, "-c", "copy", str(path))
    return str(path)


def truncated(folder, source: str, keep: float = 0.5, name: str | None = None) -> str:
    data = Path(source).read_bytes()
    path = _path(folder, name or f"truncated-{Path(source).name}")
    path.write_bytes(data[: int(len(data) * keep)])
    return str(path)


def audio_only(folder) -> str:
    path = _path(folder, "tone.m4a")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=0.5", "-c:a", "aac", str(path))
    return str(path)


def audio_with_cover(folder) -> str:
    """Audio plus cover art: ffmpeg lists the cover as a video stream (an attached picture)."""
    cover = good_png(folder, name="cover.png")
    path = _path(folder, "song.m4a")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=0.5", "-i", cover, "-map", "0",
           "-map", "1", "-c:a", "aac", "-c:v", "mjpeg", "-disposition:v:0", "attached_pic",
           str(path))
    return str(path)


def garbage(folder, name="garbage.mp4", size=4096) -> str:
    path = _path(folder, name)
    path.write_bytes(np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes())
    return str(path)


def hls_playlist(folder, local_target: str, port: int, name="playlist.m3u8") -> str:
    """An HLS playlist whose segments are a local file and a server on 127.0.0.1."""
    path = _path(folder, name)
    path.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
                    f"#EXTINF:1.0,\nhttp://127.0.0.1:{port}/segment.ts\n"
                    f"#EXTINF:1.0,\n{local_target}\n#EXT-X-ENDLIST\n")
    return str(path)


def concat_list(folder, local_target: str, name="list.txt") -> str:
    """An ffconcat script: if ffmpeg ran it, it would read another file."""
    path = _path(folder, name)
    path.write_text(f"ffconcat version 1.0\nfile '{local_target}'\n")
    return str(path)


# ----------------------------------------------------------------------------- escapes


def symlink(link: str | os.PathLike, target: str | os.PathLike) -> str:
    Path(link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return str(link)
