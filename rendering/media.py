"""Load a row's conditioning media (an image or a video) safely.

Every URI in a row is hostile. ``check_uri`` decides, without opening anything, whether a URI
lies under one of the configured media roots; only then is it read, through fsspec, never
beyond ``MediaSpec.max_bytes``. Images are decoded with Pillow (only common still-image
formats, the pixel count checked from the header before any pixel is decoded); videos with
ffmpeg in a subprocess reading a private local copy, with a protocol whitelist of ``file`` and a
whitelist of real container formats, so a playlist can never make it open the network or
another file.

Every problem with the media itself is a ``MediaError`` whose message is one line that names
the problem. PIL, numpy and the storage clients are imported inside the functions that need
them: the driver imports this module and must stay light.
"""

from __future__ import annotations

import errno
import hashlib
import io
import operator
import os
import re
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from rendering.contract import MediaInput, MediaSpec

if TYPE_CHECKING:
    from PIL import Image

RESIZE_POLICIES = ("crop", "fit", "error")
# Pillow plugins a conditioning image may use. Anything else (EPS runs Ghostscript, PDF, PSD,
# the many exotic formats) is refused before its plugin sees a byte beyond the header probe.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (camera JPEGs)
# ffmpeg demuxers a conditioning video may use: real containers that hold their media inline.
# Playlists and indirections (hls, dash, concat, image2 patterns, tee, ...) are not on it.
VIDEO_FORMATS = "mov,mp4,matroska,webm,avi,gif"
# ffmpeg may only open the local copy it is given.
VIDEO_PROTOCOLS = "file"

_MESSAGE_LIMIT = 300
_CHUNK = 1 << 20
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.S)
_LOCAL_SCHEMES = ("file",)
_HTTP_SCHEMES = ("http", "https")
_BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # scheme://bucket/key
_PATH_SCHEMES = ("memory",)  # scheme://path, the whole of it a path
_DEFAULT_PORTS = {"http": 80, "https": 443}


class MediaError(ValueError):
    """A row's media cannot be used. ``str(exc)`` is one line that names the problem.

    ``retryable`` is True only where the media may well load on another try (a storage
    error other than not-found or permission denied, ffmpeg missing); bad media never is.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(_one_line(message))
        self.retryable = retryable


# ----------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class _Location:
    """A URI reduced to what decides containment: a namespace and a list of path segments."""

    namespace: tuple  # ("local",) | ("http", scheme, host[:port]) | ("store", scheme, bucket)
    segments: tuple[str, ...]
    target: str  # what to read: a real local path, or the normalised URI


def check_uri(uri: str, roots: tuple[str, ...]) -> str:
    """Return the URI to read if it lies under one of the roots, else raise MediaError.

    Nothing is opened: only local symlinks are resolved (``os.path.realpath``), so ``..`` and
    links that leave a root are caught. A root is a folder (a trailing slash changes nothing);
    a URI must name something strictly inside it. Local paths and ``file://`` URIs come back
    as real local paths; other URIs come back normalised.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise MediaError("media URI is empty")
    if "\x00" in uri:
        raise MediaError(f"media URI {_show(uri)} contains a NUL byte")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise MediaError(f"media URI {_show(uri)} contains control characters")
    if not roots:
        raise MediaError(f"media URI {_show(uri)} refused: no media roots are configured "
                         "(input.media_roots), so no media may be read")
    location = _parse(uri, root=False)
    for root in roots:
        allowed = _parse(root, root=True)
        if (allowed.namespace == location.namespace
                and len(location.segments) > len(allowed.segments)
                and location.segments[:len(allowed.segments)] == allowed.segments):
            return location.target
    raise MediaError(f"media URI {_show(uri)} is outside the media roots (input.media_roots)")


def _parse(uri: str, root: bool) -> _Location:
    what = "media root" if root else "media URI"
    if "::" in uri:
        raise MediaError(f"{what} {_show(uri)} chains filesystems ('::'); not allowed")
    match = _SCHEME_RE.match(uri)
    if not match:
        return _local(uri, uri, what)
    scheme, rest = match.group(1).lower(), match.group(2)
    if rest.startswith("//") and _has_credentials(scheme, rest[2:]):
        raise MediaError(f"{what} {scheme}://… carries credentials (user:secret@ or similar);"
                         " refused, and credentials are never read from rows")
    if scheme in _LOCAL_SCHEMES:
        return _local(_file_uri_path(uri, rest, what), uri, what)
    if scheme in _HTTP_SCHEMES:
        return _http(uri, scheme, what, root)
    if scheme in _BUCKET_SCHEMES or scheme in _PATH_SCHEMES:
        return _store(uri, scheme, rest, what, root)
    raise MediaError(f"{what} {_show(uri)}: scheme '{_clip(scheme, 20)}' is not allowed for media"
                     " (local paths, file://, s3://, gs://, az://, memory://, http(s)://)")


def _has_credentials(scheme: str, after_slashes: str) -> bool:
    authority = re.split(r"[/?#]", after_slashes, maxsplit=1)[0]
    if "@" in authority:
        return True
    # A secret may itself hold '/', cutting the authority short: bucket names never hold ':'.
    return scheme in _BUCKET_SCHEMES and ":" in authority


def _file_uri_path(uri: str, rest: str, what: str) -> str:
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host.lower() not in ("", "localhost"):
            raise MediaError(f"{what} {_show(uri)} names another host; file:// URIs must be local")
        return slash + path
    return rest


def _local(path: str, uri: str, what: str) -> _Location:
    if not path.startswith("/"):
        raise MediaError(f"{what} {_show(uri)} is not an absolute path")
    real = os.path.realpath(path)
    segments = tuple(s for s in real.split("/") if s)
    return _Location(("local",), segments, real)


def _http(uri: str, scheme: str, what: str, root: bool) -> _Location:
    try:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise MediaError(f"{what} {_show(uri)} is not a valid URL") from None
    if not host:
        raise MediaError(f"{what} {_show(uri)} has no host")
    if parts.fragment or uri.endswith("#"):
        raise MediaError(f"{what} {_show(uri)} has a fragment ('#'); not allowed")
    shown_host = f"[{host}]" if ":" in host else host
    authority = shown_host if port in (None, _DEFAULT_PORTS[scheme]) else f"{shown_host}:{port}"
    if re.search(r"%(2f|5c)", parts.path, re.I) or "\\" in parts.path:
        raise MediaError(f"{what} {_show(uri)} has an encoded or backslash path separator")
    segments = _segments(parts.path.lstrip("/"), uri, what, root, decode=True)
    target = urlunsplit((scheme, authority, parts.path or "/", parts.query, ""))
    return _Location(("http", scheme, authority), segments, target)


def _store(uri: str, scheme: str, rest: str, what: str, root: bool) -> _Location:
    if not rest.startswith("//"):
        raise MediaError(f"{what} {_show(uri)} is malformed (expected {scheme}://...)")
    if "?" in rest or "#" in rest:
        raise MediaError(f"{what} {_show(uri)} has a query or fragment ('?', '#'); not allowed")
    if "\\" in rest:
        raise MediaError(f"{what} {_show(uri)} contains a backslash; not allowed")
    body = rest[2:]
    if scheme in _PATH_SCHEMES:
        body = body.lstrip("/")
        segments = _segments(body, uri, what, root, decode=False)
        return _Location(("store", scheme, ""), segments, f"{scheme}://{'/'.join(segments)}")
    bucket, _, key = body.partition("/")
    if not bucket:
        raise MediaError(f"{what} {_show(uri)} has no bucket")
    segments = _segments(key, uri, what, root, decode=False) if key else ()
    return _Location(("store", scheme, bucket), segments, f"{scheme}://{bucket}/{'/'.join(segments)}")


def _segments(path: str, uri: str, what: str, root: bool, decode: bool) -> tuple[str, ...]:
    parts = path.split("/") if path else []
    if root and parts and parts[-1] == "":
        parts.pop()  # a root's trailing slash: the same folder
    for part in parts:
        plain = unquote(part) if decode else part
        if part == "":
            raise MediaError(f"{what} {_show(uri)} has an empty path segment"
                             + ("" if root else " (or names a folder, not a file)"))
        if plain in (".", ".."):
            raise MediaError(f"{what} {_show(uri)} has a '.' or '..' path segment")
    return tuple(unquote(p) if decode else p for p in parts)


# ----------------------------------------------------------------------------- reading


def read_media(media: MediaInput, spec: MediaSpec) -> tuple[bytes, str]:
    """The media's bytes (inline, or read from its checked URI) and their sha256."""
    sink = io.BytesIO()
    digest = _read_into(media, spec, sink)
    return sink.getvalue(), digest


def _read_into(media: MediaInput, spec: MediaSpec, sink: BinaryIO) -> str:
    """Write the media's bytes to ``sink`` (at most ``spec.max_bytes``); return their sha256."""
    if media.data is not None:
        data = bytes(media.data)
        if len(data) > spec.max_bytes:
            raise MediaError(f"inline media is {len(data)} bytes, over limits.max_media_bytes "
                             f"({spec.max_bytes})")
        digest = hashlib.sha256(data).hexdigest()
        if media.sha256 and media.sha256.lower() != digest:
            raise MediaError("inline media bytes do not match their sha256")
        sink.write(data)
        return digest
    if not media.uri:
        raise MediaError("media has neither a URI nor inline bytes")
    target = check_uri(media.uri, spec.roots)
    shown = _show(media.uri)
    try:
        digest = _fetch(target, shown, spec.max_bytes, sink)
        if media.sha256 and media.sha256.lower() != digest:
            raise MediaError(f"media {shown} does not match its expected sha256")
        return digest
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"media {shown} not found") from None
    except IsADirectoryError:
        raise MediaError(f"media {shown} is a folder, not a file") from None
    except PermissionError:
        raise MediaError(f"media {shown}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - storage clients raise many kinds
        raise MediaError(f"cannot read media {shown}: {_describe(exc, target)}",
                         retryable=True) from None


def _fetch(target: str, shown: str, limit: int, sink: BinaryIO) -> str:
    if target.startswith("/"):
        return _fetch_local(target, shown, limit, sink)
    import fsspec

    from rendering import storage

    if target.split(":", 1)[0] in _HTTP_SCHEMES:
        # A root's server may redirect anywhere; a redirect is not followed.
        fs, path = fsspec.core.url_to_fs(target, allow_redirects=False)
    else:
        fs, path = storage.filesystem(target)
    info = storage.with_retries(f"stat media {shown}", fs.info, path)
    if info.get("type", "file") == "directory":
        raise IsADirectoryError(path)
    if info.get("type", "file") != "file":
        raise MediaError(f"media {shown} is not a regular file")
    size = info.get("size")
    if size is not None and size > limit:
        raise MediaError(f"media {shown} is {size} bytes, over limits.max_media_bytes ({limit})")

    def attempt():
        sink.seek(0)
        sink.truncate()
        with fs.open(path, "rb") as f:
            return _copy_bounded(f, sink, limit)

    digest = storage.with_retries(f"read media {shown}", attempt)
    if digest is None:
        raise MediaError(f"media {shown} is over limits.max_media_bytes ({limit} bytes)")
    return digest


def _fetch_local(path: str, shown: str, limit: int, sink: BinaryIO) -> str:
    """Read a local file that check_uri resolved, refusing one swapped for a link or a pipe."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # ELOOP: the last component became a symlink after the check
            raise MediaError(f"media {shown} changed into a symlink while being read") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"media {shown} is not a regular file")
        proc_link = f"/proc/self/fd/{fd}"
        if os.path.exists(proc_link) and os.readlink(proc_link) != path:
            raise MediaError(f"media {shown} moved while being opened; refused")
        if info.st_size > limit:
            raise MediaError(f"media {shown} is {info.st_size} bytes, over limits.max_media_bytes ({limit})")
        digest = _copy_bounded(f, sink, limit)
    if digest is None:
        raise MediaError(f"media {shown} is over limits.max_media_bytes ({limit} bytes)")
    return digest


def _copy_bounded(source: BinaryIO, sink: BinaryIO, limit: int) -> str | None:
    """Copy at most ``limit`` bytes; None if there are more (only ``limit + 1`` are ever read)."""
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = source.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return digest.hexdigest()
        total += len(chunk)
        if total > limit:
            return None
        digest.update(chunk)
        sink.write(chunk)


# ----------------------------------------------------------------------------- images


def load_image(media: MediaInput, spec: MediaSpec, width: int, height: int) -> tuple["Image.Image", str]:
    """An RGB image of exactly ``width`` x ``height`` (resized per ``spec.resize``) and the
    sha256 of the source bytes."""
    width, height = _as_count(width, "width"), _as_count(height, "height")
    _check_policy(spec)
    data, digest = read_media(media, spec)
    name = _name(media)
    image = _decode_image(data, spec, name)
    try:
        return _fit_image(image, spec.resize, width, height), digest
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a resize of odd input must still fail the row only
        raise MediaError(f"{name} cannot be resized to {width}x{height}: "
                         f"{type(exc).__name__}: {exc}") from None


def _decode_image(data: bytes, spec: MediaSpec, name: str) -> "Image.Image":
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            width, height = image.size
            if width < 1 or height < 1:
                raise MediaError(f"{name} has an empty size {width}x{height}")
            if width * height > spec.max_pixels:
                raise MediaError(f"{name} is {width}x{height} = {width * height} pixels, over "
                                 f"limits.max_media_pixels ({spec.max_pixels}); not decoded")
            if image.format != "MPO" and getattr(image, "is_animated", False):
                frames = getattr(image, "n_frames", "several")
                raise MediaError(f"{name} is an animated or multi-page {image.format} ({frames} "
                                 "frames); a conditioning image must be a still (send animations "
                                 "as video)")
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
                pass
            return _to_rgb(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"{name} is too large to decode safely (decompression bomb): {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name} is not an image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input
        raise MediaError(f"{name} cannot be decoded (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from None


def _to_rgb(image: "Image.Image") -> "Image.Image":
    """RGB, 8 bits: high-depth grey is scaled down, transparency composited over black."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        import numpy as np

        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        elif mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0  # 16-bit grey (PNG, TIFF) to 8 bits
        grey = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _fit_image(image: "Image.Image", policy: str, width: int, height: int) -> "Image.Image":
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    if policy == "error":
        raise MediaError(f"image is {image.width}x{image.height} but the row needs "
                         f"{width}x{height} (render.media_resize is 'error')")
    lanczos = Image.Resampling.LANCZOS
    if policy == "fit":
        return ImageOps.pad(image, (width, height), method=lanczos, color=(0, 0, 0))
    return ImageOps.fit(image, (width, height), method=lanczos)


# ----------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class VideoInfo:
    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    stream: int  # index of the first real video stream (cover art skipped)
    codec: str
    width: int  # as displayed, after any rotation in the stream's display matrix
    height: int


def load_video(media: MediaInput, spec: MediaSpec, num_frames: int, width: int,
               height: int) -> tuple[list["Image.Image"], str]:
    """Exactly ``num_frames`` RGB frames (the video's first ones) at ``width`` x ``height``,
    and the sha256 of the source bytes."""
    width, height = _as_count(width, "width"), _as_count(height, "height")
    num_frames = _as_count(num_frames, "num_frames")
    _check_policy(spec)
    if num_frames > spec.max_video_frames:
        raise MediaError(f"the row needs {num_frames} video frames, over limits.max_media_frames "
                         f"({spec.max_video_frames})")
    name = _name(media)
    with tempfile.TemporaryDirectory(prefix="reelfarm-media-") as folder:
        path = os.path.join(folder, "input")  # no extension: nothing for ffmpeg to guess from
        with open(path, "wb") as f:
            digest = _read_into(media, spec, f)
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
    from rendering.encode import ffmpeg_exe

    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", *_input_args(path, spec)]
    proc = _run_ffmpeg(argv, spec, name, "probing")
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

    from rendering.encode import ffmpeg_exe

    if spec.resize == "error" and (info.width, info.height) != (width, height):
        raise MediaError(f"video is {info.width}x{info.height} but the row needs "
                         f"{width}x{height} (render.media_resize is 'error')")
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *_input_args(path, spec),
            "-map", f"0:{info.stream}", "-an", "-sn", "-dn", "-frames:v", str(num_frames),
            "-fps_mode", "passthrough", "-vf", _video_filter(spec.resize, width, height),
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    proc = _run_ffmpeg(argv, spec, name, "decoding")
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


def _run_ffmpeg(argv: list[str], spec: MediaSpec, name: str, doing: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=spec.decode_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise MediaError(f"{doing} {name} took longer than limits.media_decode_timeout_s "
                         f"({spec.decode_timeout_s:g} s)") from None
    except OSError as exc:
        raise MediaError(f"cannot run ffmpeg for {name}: {exc.strerror or exc}",
                         retryable=True) from None


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


# ----------------------------------------------------------------------------- helpers


def _as_count(value, what: str) -> int:
    """A positive integer (numpy integers from a Parquet row included), else MediaError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise MediaError(f"media needs a positive integer {what}, got {_clip(repr(value), 40)}")
    return number


def _check_policy(spec: MediaSpec) -> None:
    if spec.resize not in RESIZE_POLICIES:
        raise MediaError(f"render.media_resize must be one of {', '.join(RESIZE_POLICIES)}, "
                         f"got {_clip(str(spec.resize), 40)!r}")


def _name(media: MediaInput) -> str:
    return "inline media" if media.data is not None else f"media {_show(media.uri or '')}"


def _show(uri: str) -> str:
    """A URI fit for a message: credentials and query strings elided, control bytes escaped,
    at most 120 characters."""
    text = uri
    match = _SCHEME_RE.match(text)
    if match and "@" in match.group(2):  # user:secret@ (even a malformed one) never shows
        lead = "://" if match.group(2).startswith("//") else ":"
        text = f"{match.group(1)}{lead}…@{text.rsplit('@', 1)[1]}"
    if "?" in text:
        text = text.split("?", 1)[0] + "?…"
    text = repr(text)[1:-1] if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) else text
    return f"'{_clip(text, 120)}'"


def _describe(exc: BaseException, target: str) -> str:
    text = f"{type(exc).__name__}: {exc}"
    query = urlsplit(target).query if "://" in target else ""
    return text.replace(query, "…") if query else text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _one_line(message: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(message))
    text = " ".join(text.split())
    return _clip(text, _MESSAGE_LIMIT)
