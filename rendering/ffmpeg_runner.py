"""Run ffmpeg the one safe way, so no caller has to get it right again.

Every ffmpeg reelfarm starts (encoding a video, counting its frames, writing a GIF preview,
probing and decoding conditioning media) goes through ``run_ffmpeg``: an argv list and no shell,
stdin fed or closed, stdout and stderr read to the end by one ``communicate`` (a stderr pipe
nobody reads fills up and hangs a long run), a deadline, and a failure told in one short line
(a whole log pasted into a manifest's error cell helps nobody). This module imports nothing
heavy: the driver imports modules that use it.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

# The most characters of an error message: what a manifest's error cell or a log line keeps.
MESSAGE_LIMIT = 300


class FfmpegError(RuntimeError):
    """ffmpeg could not start, or exited non-zero. ``str(exc)`` is one line."""


class FfmpegTimeout(FfmpegError):
    """ffmpeg did not finish in its time and was killed."""


@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg on PATH, else the static build that imageio-ffmpeg ships (it has libx264)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(argv: list[str], stdin: bytes | None = None, *, timeout_s: float,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``stdin`` fed (None: no input at all) and its output captured; it is
    killed at ``timeout_s``.

    Raises ``FfmpegTimeout`` past the deadline, and ``FfmpegError`` when it cannot start or,
    with ``check``, exits non-zero (the message ends with the end of its log). Without
    ``check`` the caller reads the exit code and the log itself.
    """
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False, **feed)
    except subprocess.TimeoutExpired as exc:
        raise FfmpegTimeout(f"ffmpeg did not finish in {timeout_s:g} s") from exc
    except OSError as exc:
        raise FfmpegError(f"cannot run ffmpeg: {exc.strerror or exc}") from exc
    if check and proc.returncode != 0:
        raise FfmpegError(f"ffmpeg exited {proc.returncode}: {one_line(proc.stderr)}")
    return proc


def one_line(text: bytes | str) -> str:
    """A log or an error as one line of at most ``MESSAGE_LIMIT`` characters: its end, where
    ffmpeg (and most libraries) say what went wrong."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[-MESSAGE_LIMIT:] if text else "no output"
