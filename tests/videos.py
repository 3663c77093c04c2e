"""Read a rendered MP4 back: codec, pixel format, frame count, and whether it streams in browsers."""

from __future__ import annotations

import re
import struct
import subprocess

from rendering.encode import count_frames
from rendering.ffmpeg_runner import ffmpeg_exe


def top_level_boxes(path: str) -> list[str]:
    """The MP4's top-level box types in file order (moov before mdat means +faststart)."""
    boxes = []
    with open(path, "rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                break
            size, kind = struct.unpack(">I4s", header)
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0] - 8
            boxes.append(kind.decode("latin-1"))
            if size < 8:
                break
            f.seek(size - 8, 1)
    return boxes


def probe(path: str) -> dict:
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path],
                          capture_output=True, text=True).stderr
    stream = re.search(r"Video: (\w+)[^,]*, (\w+).*?, (\d+)x(\d+)", info)
    boxes = top_level_boxes(path)
    return {
        "codec": stream.group(1) if stream else None,
        "pix_fmt": stream.group(2) if stream else None,
        "size": (int(stream.group(3)), int(stream.group(4))) if stream else None,
        "frames": count_frames(path),
        "faststart": "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"),
    }
