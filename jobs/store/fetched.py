"""Committed manifest objects fetched: many at once, in order, and once a process while they
stay as listed.

A command reads what is committed more than once: ``status`` decodes the live shards' footers
to order them, then their rows; the report asks for the columns the manifests have, then their
rows; each reader lists ``manifests/`` and reads the newest checkpoint. Each object fetched with
what a listing said of it (the live shards, the checkpoint) is kept under that (size, stamp,
and its ETag on S3 or inode on local disk), up to ``KEPT_BYTES``: a rewritten object is listed
otherwise, so it is fetched anew.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

READ_THREADS = 16  # small objects are bound by latency: read this many at once
KEPT_BYTES = 32 << 20  # live shards are 17 KB each, fewer than 2 x segment_shards; a checkpoint
# of ten million rows is 0.3 MB: what a command reads twice fits many times over
_TAGS = ("ETag", "ino", "generation")  # what names an object's content or file, by filesystem

_kept: OrderedDict[tuple, bytes] = OrderedDict()
_kept_bytes = 0
_lock = threading.Lock()


def stamp(info: dict) -> float | None:
    """An object's modification time in seconds: ``mtime`` on local disk, ``LastModified`` on
    object stores; None when the filesystem gives neither."""
    found = info.get("mtime", info.get("LastModified"))
    if hasattr(found, "timestamp"):
        return found.timestamp()
    return float(found) if isinstance(found, (int, float)) else None


def fetch_in_order(fs, objects: list[tuple[str, dict | None]]):
    """The bytes of each (path, what a listing said of it, if known), in order: kept ones at
    once, the others fetched ``READ_THREADS`` at a time (at most twice as many ahead), as small
    objects are bound by latency. They are decoded by the caller: Arrow decoding footers on
    pool threads held 1.8 GB for 15,625 shard manifests (120 MB on the caller's thread)."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        ahead = []
        for path, info in objects:
            ahead.append(pool.submit(fetch, fs, path, info))
            if len(ahead) >= 2 * READ_THREADS:
                yield ahead.pop(0).result()
        for future in ahead:
            yield future.result()


def fetch(fs, path: str, info: dict | None) -> bytes:
    """The object at ``path``, as listed (``info``): kept from an earlier fetch, or fetched and
    kept. Without ``info``, or one that does not name the content, it is fetched each time."""
    key = _key(path, info)
    with _lock:
        data = _kept.get(key) if key else None
        if data is not None:
            _kept.move_to_end(key)
            return data
    data = fs.cat_file(path)
    if key and len(data) <= KEPT_BYTES:
        _keep(key, data)
    return data


def _key(path: str, info: dict | None) -> tuple | None:
    if not info:
        return None
    tags = tuple(info.get(tag) for tag in _TAGS)
    made = stamp(info)
    if made is None or not any(tag is not None for tag in tags):
        return None
    return path, info.get("size"), made, tags


def _keep(key: tuple, data: bytes) -> None:
    global _kept_bytes
    with _lock:
        if key in _kept:
            return
        _kept[key] = data
        _kept_bytes += len(data)
        while _kept_bytes > KEPT_BYTES:
            _, dropped = _kept.popitem(last=False)
            _kept_bytes -= len(dropped)


def clear() -> None:
    """Forget what was kept: what a new process knows (a benchmark running commands in one)."""
    global _kept_bytes
    with _lock:
        _kept.clear()
        _kept_bytes = 0
