"""WebDataset shards: committed rows packed into tar shards, each written once, for training code.

Training code streams tar shards (WebDataset); a render farm makes one MP4 per row. This module
turns committed rows into shards after they are committed, from the manifests and never from
in-flight state, so reruns, resumes and repairs all agree on what a shard holds:

```
<output>/shards/00000.tar      samples: {key}.json, {key}.mp4, {key}.txt (+ other artifacts)
<output>/shards/00000.parquet  its index: every row of its range (ok and failed), sample offsets
<output>/shards/00000.done     its marker, written last: samples, bytes, sha256 of the tar
```

- **Membership is fixed by position**: shard ``n`` holds the rows whose ``row_index`` is in
  ``[n * rows_per_shard, (n + 1) * rows_per_shard)`` (clipped to the input's row count). A shard
  is packed once every row of its range is committed; its ok rows become samples, its failed
  rows are listed in the index with status ``failed`` and not packed. No row can be in two
  shards, and no ok row of a packed shard is left out.
- **Sample keys** are the rows' output keys (``jobs.rows.output_key``) with every ``.`` made
  ``_``: WebDataset cuts a file name at its first dot, so a key may hold none. Output keys are
  unique through the hash of the full id they end with (``-<12 hex>``), which the replacement
  leaves alone, so sample keys are unique too.
- **Members**: ``{key}.json`` holds every manifest field of the row (carried columns under
  their own names) except the five that describe a run rather than the sample (``attempts``,
  ``render_s``, ``committed_at``, ``redo_of``, ``stages``); ``{key}.txt`` the prompt;
  ``{key}.mp4`` the video; any other artifact ``{key}.{name}.{ext}`` (its name and its file's
  extension: a stage's keyframe is ``{key}.keyframe.png``).
- **Deterministic**: samples in row order, members in name order, tar headers fixed (mtime 0,
  uid/gid 0, no user or group names, mode 0644), JSON with sorted keys. The same input and
  config give byte-identical tars, whether a shard was packed during the run or on a resume.
- **Exactly once**: a shard is built in a local temp file and published whole
  (``storage.upload_file``), then its index, then its marker, last. A crash leaves no partial
  tar (at most a whole tar with no marker, which the next run packs again, to the same bytes).
  Readers use shards that have a marker. A shard whose marker exists with the same content
  (and whose tar and index are there) is never written again.
- **Repairs and grown inputs**: the marker records a digest of the rows it was packed from
  (identity, status, artifact hashes). When a repair (``render --redo``) changes a row of a
  packed shard, or a grown input adds rows to the last shard's range, the shard is packed
  again: its marker is removed first, so until the new one is written it reads as not packed.
- **keep_videos=False** deletes a packed row's loose artifacts (``videos/<key>.mp4``, ...) once
  its shard's marker is written. The rows stay committed in the manifests, so a resume renders
  nothing again; a later repack of that shard takes the dropped artifacts from the shard's
  own tar (checked against the manifest's sha256). A ``verify`` must then look for those rows
  inside the shards (``packed_samples``) instead of at their loose paths; ``check_shards``
  checks the shards themselves.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import posixpath
import queue
import re
import tarfile
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from jobs.store import layout, manifest
from jobs.store.hashset import HashSet
from jobs.store.job_file import read_job
from jobs.input.rows import output_key
from rendering import storage

logger = logging.getLogger(__name__)

FORMAT = "reelfarm-webdataset/1"  # in every marker: what wrote the shard and how to read it
TAR_SUFFIX, INDEX_SUFFIX, MARKER_SUFFIX = ".tar", ".parquet", ".done"
# Fields that describe a run, not the sample: two renders of the same row differ in them, so
# they stay out of the sample's JSON (the manifests keep them).
RUN_FIELDS = frozenset({"attempts", "render_s", "committed_at", "redo_of", "stages"})
VIDEO = "video"  # the artifact that becomes {key}.<its extension>
RESERVED_EXTENSIONS = frozenset({"json", "txt"})
# Completed shards waiting for the packing thread: enough to ride out one slow upload without
# holding many shards' records in memory; past it add() waits (packing is far faster than
# rendering, so in practice it never does).
QUEUE_SHARDS = 2
# Downloads in flight while a tar is written: fetching objects one by one from an object store
# is bound by request latency (tens of ms each), not bandwidth.
PREFETCH = 8
_CHECK_THREADS = 8  # markers and loose-object checks read at once (small, latency-bound requests)
_CHUNK = 1 << 20
_EXT_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),  # the sample's key in the tar; null for a failed row (not packed)
    ("id", pa.string()),
    ("row_index", pa.int64()),
    ("occurrence", pa.int32()),
    ("status", pa.string()),
    ("error_code", pa.string()),
    ("member", pa.string()),  # the video's member name in the tar
    ("offset", pa.int64()),  # where the video's bytes start in the tar (for range reads)
    ("bytes", pa.int64()),  # the video's size
    ("sha256", pa.string()),  # the video's sha256
])


class PackError(RuntimeError):
    """A shard cannot be packed (or the output's shards disagree with this job); says why."""


@dataclass(frozen=True)
class PackSpec:
    """How committed rows become WebDataset shards (``output.webdataset``)."""

    rows_per_shard: int = 1000  # input rows per shard, ok and failed: fixes each shard's range
    keep_videos: bool = True  # False: delete a row's loose artifacts once its shard is packed

    def __post_init__(self):
        if not isinstance(self.rows_per_shard, int) or self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be a positive integer, got "
                             f"{self.rows_per_shard!r}")


# ---------------------------------------------------------------------------------------------
# Names and membership: pure functions every run agrees on.

def sample_key(row_id: str) -> str:
    """The WebDataset key of a row: its output key with no dots (see the module docstring)."""
    return output_key(row_id).replace(".", "_")


def shard_count(total_rows: int, rows_per_shard: int) -> int:
    return -(-total_rows // rows_per_shard)


def shard_range(n: int, rows_per_shard: int, total_rows: int) -> tuple[int, int]:
    """The row_index range [first, end) of shard ``n``."""
    first = n * rows_per_shard
    return first, min(first + rows_per_shard, total_rows)


def shard_name(n: int) -> str:
    return f"{n:05d}"


def sample_hash(row_id: str, occurrence: int, sha256: str | None) -> int:
    """64-bit key of a packed row and its video's hash, for ``packed_samples`` lookups."""
    text = f"{row_id}\x00{occurrence}\x00{sha256}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


class _Content:
    """An order-free digest of the rows a shard was packed from: identity, status and artifact
    hashes. Rows can be added in any order (a manifest scan meets them scattered), so a
    resume can tell whether a packed shard still matches the manifests without holding them."""

    def __init__(self):
        self.rows = 0
        self._sum = 0

    def add(self, rec: dict) -> None:
        artifacts = sorted(f"{a['name']}={a['sha256']}" for a in _artifacts(rec))
        identity = "\x00".join([str(rec["row_index"]), str(rec["occurrence"]), rec["id"],
                                rec["status"], ",".join(artifacts)])
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).digest()
        self._sum = (self._sum + int.from_bytes(digest, "big")) % (1 << 256)
        self.rows += 1

    @property
    def value(self) -> str:
        return f"{self.rows}:{self._sum:064x}"


def content_of(records: Iterable[dict]) -> str:
    content = _Content()
    for rec in records:
        content.add(rec)
    return content.value


# ---------------------------------------------------------------------------------------------
# The packer: accumulates committed rows per shard and packs complete shards in the background.

class Packer:
    """Packs each shard once all its rows are committed, on one background thread.

    The driver creates it at the start of a run, calls ``seed_from_output()`` (rows committed by
    earlier runs; shards already complete are packed, stale ones packed again), hands it every
    shard's records right after their manifest is committed (``add``), and calls ``close()`` at
    the end. Only records of shards not yet packed are held in memory.
    """

    def __init__(self, output_uri: str, spec: PackSpec, total_rows: int):
        self.output_uri = output_uri
        self.spec = spec
        self.total_rows = total_rows
        self.num_shards = shard_count(total_rows, spec.rows_per_shard)
        self.packed = 0  # shards this packer wrote
        self.already_packed = 0  # shards found packed (and current) by seed_from_output
        self._fs, self._root = storage.filesystem(output_uri)
        self._pending: dict[int, dict[int, dict]] = {}  # shard -> row_index -> record
        self._closed_shards: set[int] = set()  # packed, or queued to be: records go no further
        self._touched: set[int] = set()  # closed shards that got a new commit (a repair)
        self._seeded = False
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SHARDS)
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    # -- the driver's side ---------------------------------------------------------------------

    def seed_from_output(self) -> None:
        """Take in what earlier runs committed: pack the shards that are complete but not
        packed, pack again those whose rows changed since, and hold the rest until complete."""
        spec = self.spec
        # Step 1: read the markers; a shard counts as packed if its range is still its range
        # (a grown input widens the last one, which is then packed again once complete).
        markers = read_markers(self.output_uri)
        listing = {p.rsplit("/", 1)[-1] for p in _listing(self._fs, self._root)}
        for n, marker in sorted(markers.items()):
            if marker.get("rows_per_shard") != spec.rows_per_shard:
                raise PackError(
                    f"{self.output_uri}/{layout.SHARDS_DIR} was packed with rows_per_shard="
                    f"{marker.get('rows_per_shard')}, this job asks for {spec.rows_per_shard}: "
                    f"keep {marker.get('rows_per_shard')}, or render to a new output")
        done = {n: m for n, m in markers.items() if n < self.num_shards
                and (m["first_row"], m["end_row"]) == self._range(n)
                and {m["tar"], m["index"]} <= listing}  # a deleted tar is packed again
        contents = {n: _Content() for n in done}
        last_artifact: dict[int, tuple[int, str]] = {}  # shard -> (row_index, path), for step 4

        # Step 2: read every committed row once, in input order: rows of packed shards only
        # feed their digest; the others are held, and their shard is packed once complete.
        for table in manifest.iter_shards(self.output_uri):
            touched = set()
            for rec in _stored_rows(table):
                n = rec["row_index"] // spec.rows_per_shard
                if n >= self.num_shards:
                    continue
                if n in done:
                    contents[n].add(rec)
                    paths = [a["path"] for a in _artifacts(rec)] if rec["status"] == "ok" else []
                    if paths and rec["row_index"] >= last_artifact.get(n, (-1, ""))[0]:
                        last_artifact[n] = (rec["row_index"], paths[-1])
                else:
                    self._pending.setdefault(n, {})[rec["row_index"]] = rec
                    touched.add(n)
            for n in sorted(touched):
                self._pack_if_complete(n)
        self._seeded = True

        # Step 3: a packed shard whose rows changed since (a repair) is packed again.
        stale = {n for n in done if contents[n].value != done[n]["content"]}
        # Step 4: keep_videos=False deletes a shard's last artifact last, so its presence means
        # an interrupted run left the shard's loose artifacts behind: delete them now.
        unpruned = set()
        if not spec.keep_videos:
            candidates = sorted((n, path) for n, (_, path) in last_artifact.items()
                                if n not in stale)
            exists = _map(lambda p: self._fs.exists(storage.join(self._root, p)),
                          [path for _, path in candidates])
            unpruned = {n for (n, _), found in zip(candidates, exists) if found}
        self._closed_shards.update(done)  # stale ones are queued below: closed as well
        self.already_packed = len(done) - len(stale)
        if stale or unpruned:
            logger.info("packing again %d shard(s) whose rows changed; dropping the loose "
                        "artifacts of %d packed shard(s)", len(stale), len(unpruned))
            self._recheck(stale | unpruned)

    def add(self, records: list[dict]) -> None:
        """Take the records of a committed shard manifest (as ``jobs.run.records.record`` makes them);
        queue every pack-shard they complete. Returns at once unless packing is
        ``QUEUE_SHARDS`` shards behind."""
        if not self._seeded:
            raise RuntimeError("Packer.seed_from_output() must run before add()")
        if not records:
            return
        touched = set()
        for rec in _stored_rows(manifest.to_table(records)):
            n = rec["row_index"] // self.spec.rows_per_shard
            if n >= self.num_shards:
                logger.warning("row %r (row_index %d) is past the input's %d rows: not packed",
                               rec["id"], rec["row_index"], self.total_rows)
            elif n in self._closed_shards:
                self._touched.add(n)  # a repair of a packed shard: checked in close()
            else:
                self._pending.setdefault(n, {})[rec["row_index"]] = rec
                touched.add(n)
        for n in sorted(touched):
            self._pack_if_complete(n)

    @property
    def pending_rows(self) -> int:
        """Records held for shards not complete yet (the packer's memory)."""
        return sum(len(rows) for rows in self._pending.values())

    def flush(self) -> None:
        """Wait until every shard queued so far is packed (or failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self, cancel: bool = False) -> None:
        """Wait for pending packing, pack again the packed shards a repair changed, and raise
        the first packing error. ``cancel``: drop queued shards (the next run packs them) and
        wait only for the one being written."""
        if self._thread is not None:
            if cancel:
                try:
                    while True:
                        self._queue.get_nowait()
                        self._queue.task_done()
                except queue.Empty:
                    pass
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if not cancel and self._touched and not self._errors:
            touched, self._touched = self._touched, set()
            try:
                self._recheck(touched, background=False)
            except Exception as exc:  # noqa: BLE001 - reported below like any packing error
                self._errors.append(exc)
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> "Packer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        try:  # the run failed: stop quickly, and never mask its error with a packing one
            self.close(cancel=True)
        except Exception as error:  # noqa: BLE001
            logger.warning("packing also failed: %s", error)
        return False

    # -- internals -----------------------------------------------------------------------------

    def _range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.spec.rows_per_shard, self.total_rows)

    def _pack_if_complete(self, n: int) -> None:
        first, end = self._range(n)
        rows = self._pending.get(n, {})
        if len(rows) == end - first:
            del self._pending[n]
            self._closed_shards.add(n)
            self._submit(n, [rows[i] for i in range(first, end)])

    def _submit(self, n: int, records: list[dict]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="reelfarm-pack", daemon=True)
            self._thread.start()
        self._queue.put((n, records))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._pack(*job)
            finally:
                self._queue.task_done()

    def _pack(self, n: int, records: list[dict]) -> None:
        try:
            if pack_shard(self.output_uri, self.spec, n, self._range(n), records):
                self.packed += 1
        except Exception as exc:  # noqa: BLE001 - kept for close(); other shards go on
            logger.error("could not pack shard %s: %s: %s", shard_name(n), type(exc).__name__, exc)
            self._errors.append(exc)

    def _recheck(self, shards: set[int], background: bool = True) -> None:
        """Read the current rows of ``shards`` again and pack each (``pack_shard`` writes only
        what changed, and drops loose artifacts when asked)."""
        found: dict[int, dict[int, dict]] = {n: {} for n in shards}
        for table in manifest.iter_shards(self.output_uri):
            for rec in _stored_rows(table):
                n = rec["row_index"] // self.spec.rows_per_shard
                if n in found:
                    found[n][rec["row_index"]] = rec
        for n in sorted(shards):
            first, end = self._range(n)
            if len(found[n]) != end - first:
                logger.warning("shard %s lost committed rows since it was packed: left as it is",
                               shard_name(n))
                continue
            records = [found[n][i] for i in range(first, end)]
            if background:
                self._submit(n, records)
            else:
                self._pack(n, records)


# ---------------------------------------------------------------------------------------------
# Packing one shard.

def pack_shard(output_uri: str, spec: PackSpec, n: int, rows: tuple[int, int],
               records: list[dict]) -> bool:
    """Write shard ``n`` from the records of every row in ``rows`` (row order); True if it was
    written, False if a marker with this content was already there."""
    fs, root = storage.filesystem(output_uri)
    name = shard_name(n)
    tar_path, index_path, marker_path = (storage.join(root, layout.SHARDS_DIR, name + suffix)
                                         for suffix in (TAR_SUFFIX, INDEX_SUFFIX, MARKER_SUFFIX))
    first, end = rows
    if [r["row_index"] for r in records] != list(range(first, end)):
        raise PackError(f"shard {name} needs rows {first}..{end - 1} in order, got "
                        f"{len(records)} record(s)")
    content = content_of(records)
    ok = [r for r in records if r["status"] == "ok"]

    # Step 1: exactly once. A marker with this content: nothing to write. A marker with other
    # content (a repaired row, a grown range) goes first, so the shard reads as not packed.
    marker = _read_marker(fs, marker_path)
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
        sources = _Sources(fs, root, tar_path, tmp)
        local_tar = os.path.join(tmp, name + TAR_SUFFIX)
        index = {f.name: [] for f in INDEX_SCHEMA}
        fetched = _prefetch(sources.fetch_row, ok, PREFETCH)
        # Step 3: write the tar: samples in row order, members in name order, fixed headers.
        with contextlib.closing(sources), contextlib.closing(fetched), \
                tarfile.open(local_tar, "w", format=tarfile.PAX_FORMAT) as tar:
            for rec in records:
                video_member = offset = None
                if rec["status"] == "ok":
                    members = next(fetched)
                    for member, source in sorted(members.items()):
                        data_offset = _add_member(tar, member, source)
                        if member == members.video:
                            video_member, offset = member, data_offset
                        if isinstance(source, str) and source.startswith(tmp):
                            os.remove(source)  # a downloaded copy: disk holds one tar, not two
                video = _video(rec)
                index["key"].append(sample_key(rec["id"]) if rec["status"] == "ok" else None)
                for field in ("id", "row_index", "occurrence", "status", "error_code"):
                    index[field].append(rec[field])
                index["member"].append(video_member)
                index["offset"].append(offset)
                index["bytes"].append(video["bytes"] if video_member else None)
                index["sha256"].append(video["sha256"] if video_member else None)
        size, digest = os.path.getsize(local_tar), storage.sha256_file(local_tar)
        # Step 4: publish the tar whole (never partial), then its index.
        storage.with_retries(f"upload of {tar_path}", storage.upload_file, local_tar, fs,
                             tar_path)
        storage.with_retries(f"write of {index_path}", storage.write_bytes, fs, index_path,
                             _parquet_bytes(pa.table(index, schema=INDEX_SCHEMA)))

    # Step 5: the marker, last: from here on the shard is packed.
    marker = {"format": FORMAT, "shard": n, "tar": name + TAR_SUFFIX,
              "index": name + INDEX_SUFFIX, "rows_per_shard": spec.rows_per_shard,
              "first_row": first, "end_row": end, "samples": len(ok),
              "failed": len(records) - len(ok), "bytes": size, "sha256": digest,
              "content": content}
    storage.with_retries(f"write of {marker_path}", storage.write_bytes, fs, marker_path,
                         json.dumps(marker, indent=2, sort_keys=True).encode())
    # Step 6: keep_videos=False: the loose copies of what the shard now holds can go.
    if not spec.keep_videos:
        _drop_loose(fs, root, ok)
    elapsed = time.monotonic() - started
    logger.info("packed shard %s: %d sample(s), %d failed row(s), %.1f MB in %.2f s", name,
                len(ok), len(records) - len(ok), size / 1e6, elapsed)
    return True


class _Members(dict):
    """A sample's members: member name -> local path or bytes; ``video`` names the video's."""

    video: str | None = None


class _Sources:
    """Where a shard's artifacts are read from: their loose objects, or, for those a
    ``keep_videos=False`` run already dropped, the shard's previous tar. Every artifact is
    checked against the manifest's size and sha256 before it is packed."""

    def __init__(self, fs, root: str, tar_path: str, tmp: str):
        self._fs, self._root, self._tar_path, self._tmp = fs, root, tar_path, tmp
        self._local = isinstance(fs, LocalFileSystem)
        self._previous: tarfile.TarFile | None = None
        self._previous_missing = False
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._previous is not None:
            self._previous.close()

    def fetch_row(self, rec: dict) -> _Members:
        key = sample_key(rec["id"])
        members = _Members()
        members[f"{key}.json"] = _sample_json(rec)
        members[f"{key}.txt"] = (rec["prompt"] or "").encode("utf-8")
        for artifact in _artifacts(rec):
            member = f"{key}.{_extension(artifact)}"
            if member in members:
                raise PackError(f"row {rec['id']!r}: two members named {member!r} (artifact "
                                f"{artifact['name']!r})")
            members[member] = self._fetch(rec, artifact, member)
            if artifact["name"] == VIDEO:
                members.video = member
        return members

    def _fetch(self, rec: dict, artifact: dict, member: str) -> str:
        loose = storage.join(self._root, artifact["path"])
        local = os.path.join(self._tmp, "fetch-" + member)
        if self._local:
            path = loose if os.path.exists(loose) else None
        else:
            try:
                storage.with_retries(f"download of {loose}", self._fs.get_file, loose, local)
                path = local
            except FileNotFoundError:
                path = None
        if path is None:
            path = self._from_previous(member, local)
        if path is None:
            raise PackError(f"row {rec['id']!r}: {artifact['path']} is missing and in no shard: "
                            f"`reelfarm render --redo damaged` renders it again")
        if os.path.getsize(path) != artifact["bytes"] \
                or storage.sha256_file(path) != artifact["sha256"]:
            raise PackError(f"row {rec['id']!r}: {artifact['path']} does not match its manifest "
                            f"(size or sha256): `reelfarm render --redo damaged` renders it again")
        return path

    def _from_previous(self, member: str, local: str) -> str | None:
        with self._lock:
            if self._previous is None and not self._previous_missing:
                copy = os.path.join(self._tmp, "previous.tar")
                try:
                    storage.with_retries(f"download of {self._tar_path}", self._fs.get_file,
                                         self._tar_path, copy)
                    self._previous = tarfile.open(copy, "r:")
                except FileNotFoundError:
                    self._previous_missing = True
            if self._previous is None:
                return None
            try:
                source = self._previous.extractfile(member)
            except KeyError:
                return None
            with source, open(local, "wb") as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
            return local


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


def _sample_json(rec: dict) -> bytes:
    fields = {k: v for k, v in rec.items() if k not in RUN_FIELDS}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=_json_value)
    return text.encode("utf-8")


def _json_value(value):
    """Carried columns may hold what JSON lacks: bytes (base64), dates (ISO 8601), decimals."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _extension(artifact: dict) -> str:
    """The member extension of an artifact: the video's own file extension (``mp4``), any other
    artifact its name and extension (``poster.jpg``)."""
    suffix = posixpath.splitext(artifact["path"])[1].lstrip(".").lower()
    name = _EXT_CHARS.sub("_", artifact["name"]).strip(".") or "artifact"
    ext = (suffix or name) if artifact["name"] == VIDEO else ".".join(filter(None, [name, suffix]))
    if ext in RESERVED_EXTENSIONS:
        raise PackError(f"artifact {artifact['name']!r} would be packed as .{ext}, which the "
                        f"sample's metadata uses")
    return ext


def _artifacts(rec: dict) -> list[dict]:
    """A row's stored objects; manifests from before ``artifacts`` existed list only the video."""
    if rec.get("artifacts"):
        return rec["artifacts"]
    if rec["status"] == "ok" and rec.get("video_uri"):
        return [{"name": VIDEO, "path": rec["video_uri"], "bytes": rec["bytes"],
                 "sha256": rec["sha256"]}]
    return []


def _video(rec: dict) -> dict:
    return next((a for a in _artifacts(rec) if a["name"] == VIDEO), {"bytes": None, "sha256": None})


def _stored_rows(table: pa.Table) -> list[dict]:
    """Rows as the manifest stores them (every schema column, carried columns by their own
    names), whether read back from Parquet or just made by ``manifest.to_table``: the JSON of a
    sample is then the same whichever way its row reached the packer."""
    names = manifest.SCHEMA.names
    known = set(names)
    rows = []
    for row in table.to_pylist():
        rec = {name: row.get(name) for name in names}
        rec.update((k, v) for k, v in row.items() if k not in known and k != "key")
        rows.append(rec)
    return rows


def _drop_loose(fs, root: str, ok: list[dict]) -> None:
    """Delete the packed rows' loose artifacts; the last one goes last, alone, so that its
    presence tells a resume the shard's deletions did not finish."""
    paths = [storage.join(root, a["path"]) for rec in ok for a in _artifacts(rec)]
    if not paths:
        return
    _remove(fs, paths[:-1])
    _remove(fs, paths[-1:])


def _remove(fs, paths: list[str]) -> None:
    """Delete objects, the missing ones quietly (an earlier, interrupted run took them)."""
    if not paths:
        return
    if isinstance(fs, LocalFileSystem):
        for path in paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        return
    try:
        storage.with_retries("deletion of packed artifacts", fs.rm, paths)
    except FileNotFoundError:
        for path in paths:
            if fs.exists(path):
                fs.rm_file(path)


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


def _map(fn: Callable, items: list) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        return list(pool.map(fn, items))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# ---------------------------------------------------------------------------------------------
# Reading shards back: markers, the packed rows (for verify), and a full check.

def _read_marker(fs, path: str) -> dict | None:
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


def _listing(fs, root: str) -> list[str]:
    directory = storage.join(root, layout.SHARDS_DIR)
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    return [p for p in fs.ls(directory, detail=False)
            if storage.TEMP_MARKER not in p.rsplit("/", 1)[-1]]


def _shard_number(path: str, suffix: str) -> int | None:
    name = path.rsplit("/", 1)[-1]
    stem = name[:-len(suffix)]
    return int(stem) if name.endswith(suffix) and stem.isdigit() else None


def read_markers(output_uri: str) -> dict[int, dict]:
    """Every shard's marker, by shard number: the shards that are packed."""
    fs, root = storage.filesystem(output_uri)
    paths = {n: p for p in _listing(fs, root)
             if (n := _shard_number(p, MARKER_SUFFIX)) is not None}
    markers = {}
    read = _map(lambda p: _read_marker(fs, p), list(paths.values()))
    for n, data in zip(paths, read):
        if data is not None:
            markers[n] = data
    return markers


def packed_samples(output_uri: str) -> HashSet:
    """``sample_hash`` of every ok row in a packed shard: ``verify`` looks a row whose loose
    video is gone (``keep_videos=False``) up here. About 8 bytes a row."""
    fs, root = storage.filesystem(output_uri)
    found = HashSet()
    for n in sorted(read_markers(output_uri)):
        index = _read_index(fs, storage.join(root, layout.SHARDS_DIR, shard_name(n) + INDEX_SUFFIX))
        rows = [r for r in index.to_pylist() if r["status"] == "ok"]
        found.add([sample_hash(r["id"], r["occurrence"], r["sha256"]) for r in rows])
    return found


def _state_hash(row: dict) -> int:
    """A row as a shard lists it: ok with its video's sha256, or failed."""
    return sample_hash(row["id"], row["occurrence"],
                       row["sha256"] if row["status"] == "ok" else "failed")


def _read_index(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, use_threads=False)  # as manifest._read: no decoding threads


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _tar_members(fs, path: str) -> tuple[dict[str, tuple[int, str]], int, str]:
    """Stream a tar once: member name -> (data offset, sha256); its size and sha256."""
    members = {}
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for info in tar:
                digest = hashlib.sha256()
                if info.isreg():
                    data = tar.extractfile(info)
                    while chunk := data.read(_CHUNK):
                        digest.update(chunk)
                members[info.name] = (info.offset_data, digest.hexdigest())
        reader.drain()
    return members, reader.bytes, reader.sha256.hexdigest()


def check_shards(output_uri: str, total_rows: int | None = None) -> list[str]:
    """What is wrong with an output's shards, as one line per problem (none: consistent).

    Every marker has its tar and index; the tar's size, sha256 and sample count match the
    marker; every index row of an ok row is a sample of the tar with the video's sha256 and
    offset, and the tar holds nothing else; no row is in two shards; every ok row committed in
    a packed shard's range is in it, as committed; a shard whose range is fully committed has a
    marker (``total_rows``: the input's row count, by default the last run's from job.json).
    Loose videos are not looked at: with ``keep_videos=False`` they are gone.
    """
    fs, root = storage.filesystem(output_uri)
    problems: list[str] = []
    try:
        markers = read_markers(output_uri)
    except PackError as exc:
        return [str(exc)]
    listing = {p.rsplit("/", 1)[-1] for p in _listing(fs, root)}
    seen_rows = HashSet()  # every indexed row, to find one in two shards
    listed = HashSet()  # every indexed row with its state (_state_hash)
    ranges: dict[int, tuple[int, int]] = {}
    rows_per_shard = {m.get("rows_per_shard") for m in markers.values()}
    if len(rows_per_shard) > 1:
        problems.append(f"shards were packed with different rows_per_shard: "
                        f"{sorted(rows_per_shard)}")

    # Step 1: each packed shard against its marker and its index.
    for n, marker in sorted(markers.items()):
        name = shard_name(n)
        tar_name, index_name = name + TAR_SUFFIX, name + INDEX_SUFFIX
        missing = [f for f in (tar_name, index_name) if f not in listing]
        if missing:
            problems += [f"shards/{f} is missing (its marker is there)" for f in missing]
            continue
        first, end = marker["first_row"], marker["end_row"]
        ranges[n] = (first, end)
        try:
            members, size, digest = _tar_members(fs, storage.join(root, layout.SHARDS_DIR, tar_name))
        except (tarfile.TarError, EOFError) as exc:
            problems.append(f"shards/{tar_name} is not a readable tar ({exc})")
            continue
        if (size, digest) != (marker["bytes"], marker["sha256"]):
            problems.append(f"shards/{tar_name}: {size} bytes, sha256 {digest[:12]}..., the "
                            f"marker says {marker['bytes']} bytes, {marker['sha256'][:12]}...")
        keys = {m.split(".", 1)[0] for m in members}
        if len(keys) != marker["samples"]:
            problems.append(f"shards/{tar_name} holds {len(keys)} sample(s), the marker says "
                            f"{marker['samples']}")
        index = _read_index(fs, storage.join(root, layout.SHARDS_DIR, index_name)).to_pylist()
        if sorted(r["row_index"] for r in index) != list(range(first, end)):
            problems.append(f"shards/{index_name} does not list exactly rows {first}..{end - 1}")
        rows = np.array([sample_hash(r["id"], r["occurrence"], None) for r in index], np.uint64)
        problems += [f"row {r['id']!r} is in more than one shard (again in {name})"
                     for r, again in zip(index, seen_rows.contains(rows)) if again]
        seen_rows.add(rows)
        listed.add([_state_hash(r) for r in index])
        ok = [r for r in index if r["status"] == "ok"]
        for row in ok:
            member = members.get(row["member"] or "")
            if member is None:
                problems.append(f"row {row['id']!r} is in shards/{index_name} but not in "
                                f"{tar_name}")
            elif member != (row["offset"], row["sha256"]):
                problems.append(f"row {row['id']!r}: its video in {tar_name} does not match the "
                                f"index (offset or sha256)")
        problems += [f"sample {k!r} is in shards/{tar_name} but not in its index"
                     for k in sorted(keys - {r["key"] for r in ok})]

    # Step 2: the committed rows against the shards: each row of a packed range is listed in
    # its index as it is committed now (ok with this video, or failed).
    if total_rows is None:
        job = read_job(output_uri) or {}
        total_rows = (job.get("last_run") or {}).get("input_rows")
    per_shard = next(iter(rows_per_shard)) if len(rows_per_shard) == 1 else None
    committed: dict[int, int] = {}  # shard -> its committed rows
    columns = ["id", "row_index", "occurrence", "status", "sha256"]
    for table in manifest.iter_shards(output_uri, columns=columns) if per_shard else ():
        rows = table.to_pylist()
        for row in rows:
            n = row["row_index"] // per_shard
            committed[n] = committed.get(n, 0) + 1
        rows = [r for r in rows if r["row_index"] // per_shard in ranges]
        found = listed.contains([_state_hash(r) for r in rows])
        problems += [f"row {r['id']!r} is {r['status']} but shard "
                     f"{shard_name(r['row_index'] // per_shard)} does not hold it as committed "
                     f"(a repair since? the next run packs it again)"
                     for r, there in zip(rows, found) if not there]
    if per_shard and total_rows is not None:
        for n in range(shard_count(total_rows, per_shard)):
            first, end = shard_range(n, per_shard, total_rows)
            if n not in markers and committed.get(n, 0) == end - first:
                problems.append(f"shard {shard_name(n)}: every row is committed but it is not "
                                f"packed (the next run packs it)")
    problems += [f"shards/{f} has no marker: an interrupted pack (the next run packs it again)"
                 for f in sorted(listing) if f.endswith(TAR_SUFFIX)
                 and _shard_number(f, TAR_SUFFIX) not in markers]
    return problems
