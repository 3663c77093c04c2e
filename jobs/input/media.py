"""A row's conditioning media (``image``, ``video`` columns) as task inputs, checked unread.

A column may hold a URI (relative ones resolve against the input dataset's folder), raw bytes,
or the ``{bytes, path}`` struct Hugging Face datasets write. URIs are hostile: one outside
``input.media_roots`` fails its row here, before any worker could open it (workers check
again before reading).
"""

from __future__ import annotations

import hashlib
import posixpath

from rendering import storage
from rendering.contract import MEDIA_ROLES, MediaInput
from rendering.media import MediaError
from rendering.media.uris import check_uri

_GLOB_CHARS = "*?["


def media_identity(row: dict) -> dict:
    """What tells one row's media from another's, for the content id: hashes of inline bytes,
    the URI as written otherwise."""
    out = {}
    for role in MEDIA_ROLES:
        value = _unpacked(row.get(role))
        if isinstance(value, bytes):
            out[role] = "sha256:" + hashlib.sha256(value).hexdigest()
        elif value is not None:
            out[role] = f"uri:{value}"
    return out


def media_inputs(row: dict, cfg) -> dict[str, MediaInput] | str:
    """The row's inputs by role, or why one is unusable (the row fails as invalid_media)."""
    inputs = {}
    for role in MEDIA_ROLES:
        value = _unpacked(row.get(role))
        if value is None:
            continue
        if isinstance(value, bytes):
            if len(value) > cfg.limits.max_media_bytes:
                return (f"{role} holds {len(value)} bytes, over limits.max_media_bytes = "
                        f"{cfg.limits.max_media_bytes}")
            inputs[role] = MediaInput(data=value, sha256=hashlib.sha256(value).hexdigest())
            continue
        if not isinstance(value, str):
            return f"{role} must be a URI, bytes or a {{bytes, path}} struct, got {type(value).__name__}"
        try:
            uri = check_uri(absolute_uri(value, cfg.input.uri), media_roots(cfg))
        except MediaError as exc:
            return f"{role}: {exc}"
        inputs[role] = MediaInput(uri=uri)
    return inputs


def media_roots(cfg) -> tuple[str, ...]:
    """``input.media_roots``, or by default the folder that holds the input dataset. Local
    roots are made absolute here: workers may run in another directory."""
    if cfg.input.media_roots is not None:
        return tuple(storage.absolute(root) for root in cfg.input.media_roots)
    return (input_folder(cfg.input.uri),)


def input_folder(input_uri: str) -> str:
    """The folder of the input: the URI itself for a folder, its parent for a file or glob."""
    head = input_uri.rstrip("/")
    while any(ch in head for ch in _GLOB_CHARS) or head.endswith(".parquet"):
        head = posixpath.dirname(head)
    return storage.absolute(head or ".")


def absolute_uri(value: str, input_uri: str) -> str:
    """A relative media path is relative to the input dataset's folder, as a dataset's own
    file references are; absolute paths and URLs stay as written."""
    if "://" in value or value.startswith("/") or not value:
        return value
    return storage.join(input_folder(input_uri), value)


def _unpacked(value):
    """The bytes of a ``{bytes, path}`` struct, else its path; plain values as they are."""
    if isinstance(value, dict):
        return value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return value
