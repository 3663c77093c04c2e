"""Whether a media URI from a row may be read: it must lie under one of the media roots.

Nothing is opened to decide: the URI is reduced to a namespace and path segments, with local
symlinks resolved, ``..`` refused and credentials refused (never echoed), and compared with
each root. The messages show URIs through ``show_uri``, which never prints a secret.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from rendering.contract import MediaInput
from rendering.media import MediaError, clip

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.S)
_LOCAL_SCHEMES = ("file",)
HTTP_SCHEMES = ("http", "https")
_BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # scheme://bucket/key
_PATH_SCHEMES = ("memory",)  # scheme://path, the whole of it a path
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        raise MediaError(f"media URI {show_uri(uri)} contains a NUL byte")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise MediaError(f"media URI {show_uri(uri)} contains control characters")
    if not roots:
        raise MediaError(f"media URI {show_uri(uri)} refused: no media roots are configured "
                         "(input.media_roots), so no media may be read")
    location = _parse(uri, root=False)
    for root in roots:
        allowed = _parse(root, root=True)
        if (allowed.namespace == location.namespace
                and len(location.segments) > len(allowed.segments)
                and location.segments[:len(allowed.segments)] == allowed.segments):
            return location.target
    raise MediaError(f"media URI {show_uri(uri)} is outside the media roots (input.media_roots)")


def _parse(uri: str, root: bool) -> _Location:
    what = "media root" if root else "media URI"
    if "::" in uri:
        raise MediaError(f"{what} {show_uri(uri)} chains filesystems ('::'); not allowed")
    match = _SCHEME_RE.match(uri)
    if not match:
        return _local(uri, uri, what)
    scheme, rest = match.group(1).lower(), match.group(2)
    if rest.startswith("//") and _has_credentials(scheme, rest[2:]):
        raise MediaError(f"{what} {scheme}://… carries credentials (user:secret@ or similar);"
                         " refused, and credentials are never read from rows")
    if scheme in _LOCAL_SCHEMES:
        return _local(_file_uri_path(uri, rest, what), uri, what)
    if scheme in HTTP_SCHEMES:
        return _http(uri, scheme, what, root)
    if scheme in _BUCKET_SCHEMES or scheme in _PATH_SCHEMES:
        return _store(uri, scheme, rest, what, root)
    raise MediaError(f"{what} {show_uri(uri)}: scheme '{clip(scheme, 20)}' is not allowed for media"
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
            raise MediaError(f"{what} {show_uri(uri)} names another host; file:// URIs must be local")
        return slash + path
    return rest


def _local(path: str, uri: str, what: str) -> _Location:
    if not path.startswith("/"):
        raise MediaError(f"{what} {show_uri(uri)} is not an absolute path")
    real = os.path.realpath(path)
    segments = tuple(s for s in real.split("/") if s)
    return _Location(("local",), segments, real)


def _http(uri: str, scheme: str, what: str, root: bool) -> _Location:
    try:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise MediaError(f"{what} {show_uri(uri)} is not a valid URL") from None
    if not host:
        raise MediaError(f"{what} {show_uri(uri)} has no host")
    if parts.fragment or uri.endswith("#"):
        raise MediaError(f"{what} {show_uri(uri)} has a fragment ('#'); not allowed")
    shown_host = f"[{host}]" if ":" in host else host
    authority = shown_host if port in (None, _DEFAULT_PORTS[scheme]) else f"{shown_host}:{port}"
    if re.search(r"%(2f|5c)", parts.path, re.I) or "\\" in parts.path:
        raise MediaError(f"{what} {show_uri(uri)} has an encoded or backslash path separator")
    segments = _segments(parts.path.lstrip("/"), uri, what, root, decode=True)
    target = urlunsplit((scheme, authority, parts.path or "/", parts.query, ""))
    return _Location(("http", scheme, authority), segments, target)


def _store(uri: str, scheme: str, rest: str, what: str, root: bool) -> _Location:
    if not rest.startswith("//"):
        raise MediaError(f"{what} {show_uri(uri)} is malformed (expected {scheme}://...)")
    if "?" in rest or "#" in rest:
        raise MediaError(f"{what} {show_uri(uri)} has a query or fragment ('?', '#'); not allowed")
    if "\\" in rest:
        raise MediaError(f"{what} {show_uri(uri)} contains a backslash; not allowed")
    body = rest[2:]
    if scheme in _PATH_SCHEMES:
        body = body.lstrip("/")
        segments = _segments(body, uri, what, root, decode=False)
        return _Location(("store", scheme, ""), segments, f"{scheme}://{'/'.join(segments)}")
    bucket, _, key = body.partition("/")
    if not bucket:
        raise MediaError(f"{what} {show_uri(uri)} has no bucket")
    segments = _segments(key, uri, what, root, decode=False) if key else ()
    return _Location(("store", scheme, bucket), segments, f"{scheme}://{bucket}/{'/'.join(segments)}")


def _segments(path: str, uri: str, what: str, root: bool, decode: bool) -> tuple[str, ...]:
    parts = path.split("/") if path else []
    if root and parts and parts[-1] == "":
        parts.pop()  # a root's trailing slash: the same folder
    for part in parts:
        plain = unquote(part) if decode else part
        if part == "":
            raise MediaError(f"{what} {show_uri(uri)} has an empty path segment"
                             + ("" if root else " (or names a folder, not a file)"))
        if plain in (".", ".."):
            raise MediaError(f"{what} {show_uri(uri)} has a '.' or '..' path segment")
    return tuple(unquote(p) if decode else p for p in parts)


def media_name(media: MediaInput) -> str:
    """How messages name the media: inline, or by its URI as ``show_uri`` shows it."""
    return "inline media" if media.data is not None else f"media {show_uri(media.uri or '')}"


def show_uri(uri: str) -> str:
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
    return f"'{clip(text, 120)}'"
