"""One tar written from its rows, exactly once and byte for byte the same on every run.

- **Deterministic**: samples in row order, members in name order, tar headers fixed (mtime 0,
  uid/gid 0, no user or group names, mode 0644), JSON with sorted keys. The same input and
  config give byte-identical tars, whether a tar was packed during the run or on a resume.
- **Exactly once**: a tar is built in a local temp file and published whole
  (``storage.upload_file``), then its index, then its marker, last. A crash leaves no partial
  tar (at most a whole tar with no marker, which the next run packs again, to the same bytes).
  Readers use tars that have a marker. A tar whose marker exists with the same content (and
  whose tar and index are there) is never written again; one whose marker has other content
  (a repaired row, a grown range) loses its marker first, so until the new one is written it
  reads as not packed.
- **keep_videos=False** deletes a packed row's loose artifacts once its tar's marker is
  written, the last one last (see ``_drop_loose``). A row left out as a near-duplicate keeps
  them: one packed before it was marked gets them back from the tar's previous copy before
  the new tar replaces it, so every committed row stays somewhere ``verify`` looks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pyarrow as pa

from jobs.products.webdataset.samples import EMBEDDING, Sources
from jobs.products.webdataset.tar_index import read_marker
from jobs.products.webdataset.tars import (FORMAT, INDEX_SCHEMA, INDEX_SUFFIX, MARKER_SUFFIX,
                                           TAR_SUFFIX, VIDEO, PackError, PackSpec, artifacts,
                                           content_of, left_out, sample_key, tar_name)
from jobs.store import layout
from jobs.store.parquet_files import parquet_bytes
from rendering import storage

logger = logging.getLogger(__name__)

# Downloads in flight while a tar is written: fetching objects one by one from an object store
# is bound by request latency (tens of ms each), not bandwidth.
PREFETCH = 8


def pack_tar(output_uri: str, spec: PackSpec, n: int, rows: tuple[int, int],
             records: list[dict]) -> bool:
    """Write tar ``n`` from the records of every row in ``rows`` (row order); True if it was
    written, False if a marker with this content was already there."""
    fs, root = storage.filesystem(output_uri)
    name = tar_name(n)
    tar_path, index_path, marker_path = (storage.join(root, layout.SHARDS_DIR, name + suffix)
                                         for suffix in (TAR_SUFFIX, INDEX_SUFFIX, MARKER_SUFFIX))
    first, end = rows
    if [r["row_index"] for r in records] != list(range(first, end)):
        raise PackError(f"shard {name} needs rows {first}..{end - 1} in order, got "
                        f"{len(records)} record(s)")
    content = content_of(records, spec)
    ok = [r for r in records if r["status"] == "ok" and not left_out(r, spec)]

    # Step 1: exactly once. A marker with this content: nothing to write. A marker with other
    # content (a repaired row, a grown range) goes first, so the tar reads as not packed.
    marker = read_marker(fs, marker_path)
    if marker is not None and marker.get("content") == content \
            and fs.exists(tar_path) and fs.exists(index_path):
        if not spec.keep_videos:
            _drop_loose(fs, root, ok)
        return False
    if marker is not None:
        storage.with_retries(f"removal of {marker_path}", fs.rm_file, marker_path)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="reelfarm-pack-", ignore_cleanup_errors=True) as tmp:
        # Step 2: fetch each ok row's artifacts, checked against the manifest, a few ahead.
        sources = Sources(fs, root, tar_path, tmp)
        local_tar = os.path.join(tmp, name + TAR_SUFFIX)
        index = {f.name: [] for f in INDEX_SCHEMA}
        fetched = _prefetch(sources.fetch_row, ok, PREFETCH)
        # Step 3: write the tar: samples in row order, members in name order, fixed headers.
        with contextlib.closing(sources), contextlib.closing(fetched), \
                tarfile.open(local_tar, "w", format=tarfile.PAX_FORMAT) as tar:
            for rec in records:
                video_member = offset = None
                packed = rec["status"] == "ok" and not left_out(rec, spec)
                if left_out(rec, spec) and not spec.keep_videos:
                    sources.keep_loose(rec)
                if packed:
                    members = next(fetched)
                    for member, source in sorted(members.items()):
                        data_offset = _add_member(tar, member, source)
                        if member == members.video:
                            video_member, offset = member, data_offset
                        if isinstance(source, str) and source.startswith(tmp):
                            os.remove(source)  # a downloaded copy: disk holds one tar, not two
                video = _video(rec)
                index["key"].append(sample_key(rec["id"]) if packed else None)
                for field in ("id", "row_index", "occurrence", "status", "error_code"):
                    index[field].append(rec[field])
                index["member"].append(video_member)
                index["offset"].append(offset)
                index["bytes"].append(video["bytes"] if video_member else None)
                index["sha256"].append(video["sha256"] if video_member else None)
                index["embeddings"].append(rec.get(EMBEDDING) if video_member else None)
                index["duplicate_of"].append(rec["duplicate_of"] if left_out(rec, spec) else None)
        size, digest = os.path.getsize(local_tar), storage.sha256_file(local_tar)
        # Step 4: publish the tar whole (never partial), then its index.
        storage.with_retries(f"upload of {tar_path}", storage.upload_file, local_tar, fs,
                             tar_path)
        storage.with_retries(f"write of {index_path}", storage.write_bytes, fs, index_path,
                             parquet_bytes(pa.table(index, schema=INDEX_SCHEMA)))

    # Step 5: the marker, last: from here on the tar is packed.
    marker = {"format": FORMAT, "shard": n, "tar": name + TAR_SUFFIX,
              "index": name + INDEX_SUFFIX, "rows_per_shard": spec.rows_per_shard,
              "first_row": first, "end_row": end, "samples": len(ok),
              "failed": sum(r["status"] != "ok" for r in records), "bytes": size,
              "sha256": digest, "content": content}
    if spec.skip_duplicates:
        marker.update(skip_duplicates=True, duplicates=len(records) - len(ok) - marker["failed"])
    storage.with_retries(f"write of {marker_path}", storage.write_bytes, fs, marker_path,
                         json.dumps(marker, indent=2, sort_keys=True).encode())
    # Step 6: keep_videos=False: the loose copies of what the tar now holds can go.
    if not spec.keep_videos:
        _drop_loose(fs, root, ok)
    elapsed = time.monotonic() - started
    logger.info("packed shard %s: %d sample(s), %d failed row(s), %d left out as "
                "near-duplicates, %.1f MB in %.2f s", name, len(ok), marker["failed"],
                marker.get("duplicates", 0), size / 1e6, elapsed)
    return True


def _add_member(tar: tarfile.TarFile, name: str, source: str | bytes) -> int:
    """Add one member with fixed metadata; returns where its data starts in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    if isinstance(source, bytes):
        tar.addfile(info, io.BytesIO(source))
    else:
        with open(source, "rb") as f:
            tar.addfile(info, f)
    return data_offset


def _video(rec: dict) -> dict:
    return next((a for a in artifacts(rec) if a["name"] == VIDEO), {"bytes": None, "sha256": None})


def _drop_loose(fs, root: str, ok: list[dict]) -> None:
    """Delete the packed rows' loose artifacts; the last one goes last, alone, so that its
    presence tells a resume the tar's deletions did not finish."""
    paths = [storage.join(root, a["path"]) for rec in ok for a in artifacts(rec)]
    if not paths:
        return
    storage.remove_all_quietly(fs, paths[:-1], "packed artifacts")
    storage.remove_all_quietly(fs, paths[-1:], "packed artifacts")


def _prefetch(fn: Callable, items: list, ahead: int) -> Iterator:
    """``fn`` over ``items`` in order, with up to ``ahead`` calls running on threads."""
    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="reelfarm-fetch") as pool:
        futures = deque()
        rest = iter(items)
        for item in rest:
            futures.append(pool.submit(fn, item))
            if len(futures) >= ahead:
                break
        while futures:
            result = futures.popleft().result()
            item = next(rest, _END)
            if item is not _END:
                futures.append(pool.submit(fn, item))
            yield result


_END = object()
