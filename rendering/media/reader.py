"""Read a row's media bytes within ``limits.max_media_bytes``, from its checked URI or inline.

A URI is checked (``uris.check_uri``) before anything is opened; a local file is opened without
following links and refused if it changed under the check; a remote one through fsspec, with
retries, and http redirects are not followed. Only ``limit + 1`` bytes are ever read, so an
object without a known size still cannot fill the disk or memory.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from typing import BinaryIO
from urllib.parse import urlsplit

from rendering.contract import MediaInput, MediaSpec
from rendering.media import MediaError
from rendering.media.uris import HTTP_SCHEMES, check_uri, show_uri

_CHUNK = 1 << 20


def read_media(media: MediaInput, spec: MediaSpec) -> tuple[bytes, str]:
    """The media's bytes (inline, or read from its checked URI) and their sha256."""
    sink = io.BytesIO()
    digest = read_into(media, spec, sink)
    return sink.getvalue(), digest


def read_into(media: MediaInput, spec: MediaSpec, sink: BinaryIO) -> str:
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
    shown = show_uri(media.uri)
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

    if target.split(":", 1)[0] in HTTP_SCHEMES:
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


def _describe(exc: BaseException, target: str) -> str:
    """A storage error for a message, the URL's query (a signature, a token) elided."""
    text = f"{type(exc).__name__}: {exc}"
    query = urlsplit(target).query if "://" in target else ""
    return text.replace(query, "…") if query else text
