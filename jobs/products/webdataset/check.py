"""An output's tars audited against their markers, their indexes and the committed manifests.

Readers trust a tar once its marker is there, so ``reelfarm verify`` checks what every marker
claims, and that no committed row of a packed range is missing from its tar.
"""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np

from jobs.products.webdataset.tar_index import folder_paths, read_index, read_markers
from jobs.products.webdataset.tars import (COPY_CHUNK, INDEX_SUFFIX, TAR_SUFFIX, PackError,
                                           sample_hash, tar_count, tar_name, tar_number,
                                           tar_range)
from jobs.store import layout, manifest
from jobs.store.duplicates import Marks
from jobs.store.hashset import HashSet
from jobs.store.job_file import read_job
from rendering import storage


def _state_hash(row: dict) -> int:
    """A row as a tar's index lists it: ok with its video's sha256, left out as a duplicate,
    or failed."""
    state = "failed" if row["status"] != "ok" else \
        "duplicate" if row.get("duplicate_of") is not None else row["sha256"]
    return sample_hash(row["id"], row["occurrence"], state)


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
        while self.read(COPY_CHUNK):
            pass


def _state(row: dict) -> str:
    if row["status"] == "ok" and row.get("duplicate_of") is not None:
        return f"a near-duplicate of {row['duplicate_of']!r}"
    return row["status"]


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
                    while chunk := data.read(COPY_CHUNK):
                        digest.update(chunk)
                members[info.name] = (info.offset_data, digest.hexdigest())
        reader.drain()
    return members, reader.bytes, reader.sha256.hexdigest()


def check_tars(output_uri: str, total_rows: int | None = None) -> list[str]:
    """What is wrong with an output's tars, as one line per problem (none: consistent).

    Every marker has its tar and index; the tar's size, sha256 and sample count match the
    marker; every index row of an ok row is a sample of the tar with the video's sha256 and
    offset, and the tar holds nothing else; no row is in two tars; every ok row committed in a
    packed tar's range is in it, as committed, but where the tar leaves duplicates out: there
    exactly the rows ``duplicates.parquet`` marks are listed as left out; a tar whose range
    is fully committed has a marker (``total_rows``: the input's row count, by default the
    last run's from job.json).
    Loose videos are not looked at: with ``keep_videos=False`` they are gone.
    """
    fs, root = storage.filesystem(output_uri)
    problems: list[str] = []
    try:
        markers = read_markers(output_uri)
    except PackError as exc:
        return [str(exc)]
    listing = {p.rsplit("/", 1)[-1] for p in folder_paths(fs, root)}
    seen_rows = HashSet()  # every indexed row, to find one in two tars
    listed = HashSet()  # every indexed row with its state (_state_hash)
    ranges: dict[int, tuple[int, int]] = {}
    rows_per_shard = {m.get("rows_per_shard") for m in markers.values()}
    if len(rows_per_shard) > 1:
        problems.append(f"shards were packed with different rows_per_shard: "
                        f"{sorted(rows_per_shard)}")

    # Step 1: each packed tar against its marker and its index.
    for n, marker in sorted(markers.items()):
        name = tar_name(n)
        tar_file, index_file = name + TAR_SUFFIX, name + INDEX_SUFFIX
        missing = [f for f in (tar_file, index_file) if f not in listing]
        if missing:
            problems += [f"shards/{f} is missing (its marker is there)" for f in missing]
            continue
        first, end = marker["first_row"], marker["end_row"]
        ranges[n] = (first, end)
        try:
            members, size, digest = _tar_members(fs, storage.join(root, layout.SHARDS_DIR,
                                                                  tar_file))
        except (tarfile.TarError, EOFError) as exc:
            problems.append(f"shards/{tar_file} is not a readable tar ({exc})")
            continue
        if (size, digest) != (marker["bytes"], marker["sha256"]):
            problems.append(f"shards/{tar_file}: {size} bytes, sha256 {digest[:12]}..., the "
                            f"marker says {marker['bytes']} bytes, {marker['sha256'][:12]}...")
        keys = {m.split(".", 1)[0] for m in members}
        if len(keys) != marker["samples"]:
            problems.append(f"shards/{tar_file} holds {len(keys)} sample(s), the marker says "
                            f"{marker['samples']}")
        index = read_index(fs, root, n).to_pylist()
        if sorted(r["row_index"] for r in index) != list(range(first, end)):
            problems.append(f"shards/{index_file} does not list exactly rows {first}..{end - 1}")
        rows = np.array([sample_hash(r["id"], r["occurrence"], None) for r in index], np.uint64)
        problems += [f"row {r['id']!r} is in more than one shard (again in {name})"
                     for r, again in zip(index, seen_rows.contains(rows)) if again]
        seen_rows.add(rows)
        listed.add([_state_hash(r) for r in index])
        ok = [r for r in index if r["status"] == "ok" and r.get("duplicate_of") is None]
        for row in ok:
            member = members.get(row["member"] or "")
            if member is None:
                problems.append(f"row {row['id']!r} is in shards/{index_file} but not in "
                                f"{tar_file}")
            elif member != (row["offset"], row["sha256"]):
                problems.append(f"row {row['id']!r}: its video in {tar_file} does not match the "
                                f"index (offset or sha256)")
        problems += [f"sample {k!r} is in shards/{tar_file} but not in its index"
                     for k in sorted(keys - {r["key"] for r in ok})]

    # Step 2: the committed rows against the tars: each row of a packed range is listed in
    # its index as it is committed now (ok with this video, or failed).
    if total_rows is None:
        job = read_job(output_uri) or {}
        total_rows = (job.get("last_run") or {}).get("input_rows")
    per_shard = next(iter(rows_per_shard)) if len(rows_per_shard) == 1 else None
    committed: dict[int, int] = {}  # tar -> its committed rows
    skipping = {n for n, m in markers.items() if m.get("skip_duplicates")}
    marks = Marks.read(output_uri) if skipping else None
    columns = ["id", "row_index", "occurrence", "status", "sha256", "committed_at"]
    for table in manifest.iter_shards(output_uri, columns=columns) if per_shard else ():
        rows = (table if marks is None else marks.mark(table)).to_pylist()
        for row in rows:
            n = row["row_index"] // per_shard
            committed[n] = committed.get(n, 0) + 1
            if n not in skipping:
                row["duplicate_of"] = None  # packed whatever dedup says
        rows = [r for r in rows if r["row_index"] // per_shard in ranges]
        found = listed.contains([_state_hash(r) for r in rows])
        problems += [f"row {r['id']!r} is {_state(r)} but shard "
                     f"{tar_name(r['row_index'] // per_shard)} does not hold it so (a repair "
                     f"since, or dedup? the next run packs it again)"
                     for r, there in zip(rows, found) if not there]
    if per_shard and total_rows is not None:
        for n in range(tar_count(total_rows, per_shard)):
            first, end = tar_range(n, per_shard, total_rows)
            if n not in markers and committed.get(n, 0) == end - first:
                problems.append(f"shard {tar_name(n)}: every row is committed but it is not "
                                f"packed (the next run packs it)")
    problems += [f"shards/{f} has no marker: an interrupted pack (the next run packs it again)"
                 for f in sorted(listing) if f.endswith(TAR_SUFFIX)
                 and tar_number(f, TAR_SUFFIX) not in markers]
    return problems
