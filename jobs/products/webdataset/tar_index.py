"""A packed output read back: which tars are packed (markers), and what each holds (indexes).

The packer reads it to resume, ``check`` to audit, and ``verify`` to find the rows whose loose
objects a ``keep_videos=False`` run dropped (``packed_samples``).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pyarrow as pa

from jobs.products.webdataset.tars import (FORMAT, INDEX_SUFFIX, MARKER_SUFFIX, PackError,
                                           sample_hash, tar_name, tar_number)
from jobs.store import layout
from jobs.store.hashset import HashSet
from jobs.store.parquet_files import read_parquet
from rendering import storage

_READ_THREADS = 8  # markers and loose-object checks read at once (small, latency-bound requests)


def read_at_once(fn: Callable, items: list) -> list:
    """``fn`` over ``items``, a few at a time on threads: small reads are bound by latency."""
    if not items:
        return []
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(fn, items))


def folder_paths(fs, root: str) -> list[str]:
    """The paths in the tars' folder, temp objects left out (none, when there is no folder)."""
    directory = storage.join(root, layout.SHARDS_DIR)
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    return [p for p in fs.ls(directory, detail=False)
            if not storage.is_temp(p)]


def read_marker(fs, path: str) -> dict | None:
    """The marker at ``path``, or None when there is none; one reelfarm did not write raises."""
    try:
        data = storage.with_retries(f"read of {path}", fs.cat_file, path)
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
    except ValueError as exc:
        raise PackError(f"{path} is not a shard marker ({exc}): it was edited, or not written "
                        f"by reelfarm; delete it and the next run packs the shard again") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise PackError(f"{path} is not a {FORMAT} shard marker: delete it and the next run "
                        f"packs the shard again")
    return marker


def read_markers(output_uri: str) -> dict[int, dict]:
    """Every tar's marker, by tar number: the tars that are packed."""
    fs, root = storage.filesystem(output_uri)
    paths = {n: p for p in folder_paths(fs, root)
             if (n := tar_number(p, MARKER_SUFFIX)) is not None}
    markers = {}
    read = read_at_once(lambda p: read_marker(fs, p), list(paths.values()))
    for n, data in zip(paths, read):
        if data is not None:
            markers[n] = data
    return markers


def read_index(fs, root: str, n: int) -> pa.Table:
    """Tar ``n``'s index: every row of its range, with its video's member, offset and hash."""
    return read_parquet(fs, storage.join(root, layout.SHARDS_DIR, tar_name(n) + INDEX_SUFFIX))


def packed_samples(output_uri: str) -> HashSet:
    """``sample_hash`` of every ok row in a packed tar: ``verify`` looks a row whose loose
    video is gone (``keep_videos=False``) up here. About 8 bytes a row."""
    fs, root = storage.filesystem(output_uri)
    found = HashSet()
    for n in sorted(read_markers(output_uri)):
        rows = [r for r in read_index(fs, root, n).to_pylist() if r["status"] == "ok"]
        found.add([sample_hash(r["id"], r["occurrence"], r["sha256"]) for r in rows])
    return found
