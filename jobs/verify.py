"""``reelfarm verify``: every committed object is where its manifest says, with its size and
sha256, and nothing stored is unaccounted for; and what a repair must render again."""

from __future__ import annotations

import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.store import layout, lease, manifest
from jobs.products.webdataset.check import check_tars
from jobs.products.webdataset.tar_index import packed_samples, read_markers
from jobs.products.webdataset.tars import sample_hash
from jobs.store.hashset import HashSet, row_hash, row_hashes
from jobs.store.job_file import OutputError, read_job, require_output
from jobs.store.listing import Listing, path_hashes
from rendering import storage

_HASH_THREADS = 8  # hashing is I/O bound on object stores
# Rows checked at a time: looked up at once, the hashes of many rows are close together in a
# set of millions, so each lookup walks few cache lines (a segment's 4,096 at a time took 3x).
_BATCH_ROWS = 65536
_REMOVE_CHUNK = 65536  # strays deleted a call at a time


@dataclass
class Audit:
    rows: int
    ok: int  # rows whose video was checked
    problems: list[str]
    strays: list[str] = field(default_factory=list)  # paths of the objects no manifest lists


def verify(output_uri: str, check_hashes: bool = True) -> Audit:
    """Every ok row's artifacts (its video, ...) exist with their sizes and sha256s; no video or
    temp file is unlisted.

    Streams the manifests a shard at a time and keeps only 8-byte hashes of rows and artifact
    paths, so an output of millions of rows is checked in bounded memory. Which objects exist,
    and their sizes, come from one listing of each artifact folder (``Listing``, read a page at
    a time), not from a request per row; only hashing reads each object.
    """
    fs, root = storage.filesystem(output_uri)
    if not fs.exists(root):
        return Audit(0, 0, [f"output {output_uri} does not exist"])
    problems: list[str] = []
    rows = ok = 0
    seen_rows, listed = HashSet(), []  # the manifests' artifact paths, hashed
    repeats: Counter = Counter()  # (id, occurrence) -> extra commits
    packed = _packed(output_uri)
    tables = manifest.iter_shards(output_uri, columns=_ARTIFACT_COLUMNS)
    # The shards to check are fixed as the first is read, before the folders are listed: every
    # row checked had its objects stored before the listing, so what a running job commits
    # meanwhile is never reported missing.
    first = next(tables, None)
    listing = Listing(fs, root)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for table in _batches(itertools.chain(() if first is None else (first,), tables)):
            rows += table.num_rows
            _count_repeats(table, seen_rows, repeats)
            ok += pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
            # Failed rows may list artifacts too: what an earlier stage made (a keyframe).
            paths, sizes, owners = _artifacts(table, root)
            hashes = path_hashes(paths)
            listed.append(hashes)
            # A row whose objects the listing shows at their sizes has nothing more to check
            # unless they are hashed: only the others are read into Python.
            look = owners if check_hashes else owners[~listing.at_size(hashes, sizes)]
            rows_to_look = table.take(np.unique(look)).to_pylist()
            problems += [p for found in _artifact_problems(fs, root, listing, rows_to_look,
                                                           check_hashes, packed, pool)
                         for p in found]
    if packed is not None:
        problems += check_tars(output_uri)
    if rows == 0:
        problems.append(f"no committed shard manifests under {output_uri}/{layout.MANIFESTS_DIR}")
    problems += [f"row {key[0]!r} is committed {n + 1} times" for key, n in repeats.items()]
    strays = sorted(_stray_objects(fs, listing, HashSet.of(listed)), key=lambda stray: stray[1])
    problems += [problem for _, problem in strays]

    success = fs.exists(storage.join(root, layout.SUCCESS_FILE))
    job = read_job(output_uri) or {}
    expected = job.get("counts", {}).get("rows")
    if success and expected is not None and expected != rows:
        problems.append(f"_SUCCESS is present but {rows} of {expected} rows are committed")
    consolidated = storage.join(root, layout.MANIFEST_FILE)
    if success and not fs.exists(consolidated):
        problems.append(f"_SUCCESS is present but {layout.MANIFEST_FILE} is missing")
    return Audit(rows, ok, problems, [path for path, _ in strays])


def hold_for_removal(output_uri: str) -> lease.Lease:
    """Hold the output as a run does, so that no run stores objects while strays are found and
    removed: a running job's stored but uncommitted videos look like strays."""
    require_output(output_uri)
    return lease.acquire(output_uri)


def check_strays_removable(output_uri: str) -> None:
    """Refuse while receipts hold rows an interrupted run stored but did not commit: their
    objects look like strays, and the next run of the job commits them without rendering."""
    fs, root = storage.filesystem(output_uri)
    receipts = storage.join(root, layout.RECEIPTS_DIR)
    if fs.exists(receipts) and fs.find(receipts):
        raise OutputError(f"{output_uri} holds rows an interrupted run stored but did not commit "
                          f"({layout.RECEIPTS_DIR}/): rerun the job to commit them, then remove "
                          f"strays")


def remove_strays(output_uri: str, strays: list[str]) -> None:
    """Delete the objects ``verify`` found that no manifest lists (``Audit.strays``); call it
    holding ``hold_for_removal``'s lease, after a ``verify`` made under it."""
    check_strays_removable(output_uri)
    fs, _ = storage.filesystem(output_uri)
    for start in range(0, len(strays), _REMOVE_CHUNK):
        fs.rm(strays[start:start + _REMOVE_CHUNK])


def rows_to_redo(output_uri: str, failed: bool, damaged: bool) -> dict[int, dict]:
    """Committed rows a repair should render again: those that failed, and ok rows whose
    artifacts are missing or do not match their size and sha256. Row hash: the commit to
    replace (its committed_at, its artifacts, and the values that say which task it was)."""
    fs, root = storage.filesystem(output_uri)
    redo: dict[int, dict] = {}
    packed = _packed(output_uri) if damaged else None
    listing = Listing(fs, root) if damaged else None
    columns = list(dict.fromkeys([*_ARTIFACT_COLUMNS, *manifest.TASK_COLUMNS, "committed_at"]))
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for table in manifest.iter_shards(output_uri, columns=columns):
            rows = table.to_pylist()
            if failed:
                redo.update((row_hash(r["id"], r["occurrence"]), r)
                            for r in rows if r["status"] == "failed")
            if damaged:
                ok = [r for r in rows if r["status"] == "ok"]
                found = _artifact_problems(fs, root, listing, ok, True, packed, pool)
                redo.update((row_hash(r["id"], r["occurrence"]), r)
                            for r, problems in zip(ok, found) if problems)
    return redo


_ARTIFACT_COLUMNS = ["row_index", "id", "occurrence", "status", "sha256", "artifacts"]


def _packed(output_uri: str) -> HashSet | None:
    """The samples of the output's WebDataset shards, or None when it has none."""
    return packed_samples(output_uri) if read_markers(output_uri) else None


def _artifact_problems(fs, root: str, listing: Listing, rows: list[dict], check_hashes: bool,
                       packed: HashSet | None, pool) -> list[list[str]]:
    """Each row's artifact problems, as ``listing`` shows its objects. A loose object that is
    gone is no problem when the row is packed in a shard (``output.keep_videos: false`` drops
    them; the shard check covers it)."""
    paths = [[storage.join(root, a["path"]) for a in row["artifacts"]] for row in rows]
    shown = listing.shown([path for row_paths in paths for path in row_paths],
                          [a["bytes"] for row in rows for a in row["artifacts"]])
    ordered = iter(shown)
    row_shown = [[next(ordered) for _ in row_paths] for row_paths in paths]

    def check(row: dict, row_paths: list[str], seen: list[bool | None]) -> list[str]:
        problems = [_check_artifact(fs, row["id"], path, a, known, check_hashes)
                    for path, a, known in zip(row_paths, row["artifacts"], seen)]
        problems = [p for p in problems if p]
        if problems and all(" is missing: " in p for p in problems) and _in_shards(packed, row):
            return []
        return problems

    # Threads only where objects are read or asked: checking a listing is a lookup.
    run = pool.map if check_hashes or None in shown else map
    return list(run(check, rows, paths, row_shown))


def _in_shards(packed: HashSet | None, row: dict) -> bool:
    """The ok row is packed in a WebDataset shard (its loose objects may be dropped)."""
    return packed is not None and row["status"] == "ok" and bool(packed.contains(
        [sample_hash(row["id"], row["occurrence"], row["sha256"])])[0])


def unlisted_artifacts(output_uri: str, examples: int = 3) -> tuple[int, list[str]]:
    """Committed artifacts that a listing of their folders does not show at their recorded
    size: how many, and the first few. ``_SUCCESS`` is written only when there are none, so an
    output whose workers stored elsewhere is never reported complete. One listing per folder
    and one read of the consolidated manifest, not a request per row."""
    fs, root = storage.filesystem(output_uri)
    listing = Listing(fs, root)
    packed = _packed(output_uri)
    count, first = 0, []
    for table in manifest.iter_consolidated(output_uri, _ARTIFACT_COLUMNS):
        paths, sizes, owners = _artifacts(table, root)
        unseen = owners[~listing.at_size(path_hashes(paths), sizes)]
        stored = [(r, a, storage.join(root, a["path"]))
                  for r in table.take(np.unique(unseen)).to_pylist() for a in r["artifacts"]]
        shown = listing.shown([path for _, _, path in stored], [a["bytes"] for _, a, _ in stored])
        for (row, artifact, path), known in zip(stored, shown):
            if known is True or _in_shards(packed, row):
                continue
            # Where the listing cannot tell (another size, a folder not listed) the object is
            # asked: one request for each, which only a damaged or unusual output has.
            if _stored_size(fs, path, artifact["bytes"], known) != artifact["bytes"]:
                count += 1
                if len(first) < examples:
                    first.append(f"{artifact['name']} of row {row['id']!r} at "
                                 f"{storage.to_uri(fs, path)}")
    return count, first


def _batches(tables):
    """``tables`` joined into tables of ``_BATCH_ROWS`` rows or more (the last may be short)."""
    held: list = []
    for table in tables:
        held.append(table)
        if sum(t.num_rows for t in held) >= _BATCH_ROWS:
            yield pa.concat_tables(held, promote_options="permissive")
            held = []
    if held:
        yield pa.concat_tables(held, promote_options="permissive")


def _artifacts(table, root: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The artifacts of ``table``'s rows, flattened: each one's path (``storage.join`` with
    ``root``), its bytes (-1 where not recorded), and the index of its row."""
    lists = table["artifacts"].combine_chunks()
    flat = lists.flatten()
    prefix = root.rstrip("/") + "/"
    paths = [prefix + path.strip("/") for path in flat.field("path").to_pylist()]
    sizes = pc.fill_null(flat.field("bytes"), -1).to_numpy()
    return paths, sizes, pc.list_parent_indices(lists).to_numpy()


def _count_repeats(table, seen: HashSet, repeats: Counter) -> None:
    """Count rows committed by an earlier shard, or earlier in this one, into ``repeats``."""
    hashes = row_hashes(table)
    again = seen.contains(hashes)
    _, first = np.unique(hashes, return_index=True)
    again[np.setdiff1d(np.arange(len(hashes)), first)] = True  # not a hash's first row here
    ids, occurrences = table["id"], table["occurrence"]
    for i in np.flatnonzero(again).tolist():
        repeats[(ids[i].as_py(), occurrences[i].as_py())] += 1
    seen.add(np.unique(hashes[~again]), checked=True)


def _stray_objects(fs, listing: Listing, listed: HashSet):
    """(path, problem) of the videos (and earlier stages' keyframes) no manifest row lists, and
    of temp objects anywhere under the output but the lease's (it cleans its own). The artifact
    folders are ``listing``'s; the other folders are searched (``find``) for temp objects only.
    """
    yield from ((path, f"leftover temporary object {path}") for path in listing.temps)
    yield from ((path, f"{what} {path} is not in any manifest")
                for what, path in listing.strays(listed))
    skip = (*Listing.FOLDERS, layout.LEASE_DIR)  # listed, or the lease's
    for entry in listing.entries:
        if entry.rstrip("/").rsplit("/", 1)[-1] not in skip:
            yield from ((p, f"leftover temporary object {p}") for p in fs.find(entry)
                        if storage.is_temp(p))


def _check_artifact(fs, row_id: str, path: str, artifact: dict, shown: bool | None,
                    check_hashes: bool) -> str | None:
    """The artifact's problem, if any; ``shown``: what the listing says of it
    (``Listing.shown``)."""
    uri, what = storage.to_uri(fs, path), f"{artifact['name']} of row {row_id!r}"
    size = _stored_size(fs, path, artifact["bytes"], shown)
    if size is None:
        return f"{what} is missing: {uri}"
    if size != artifact["bytes"]:
        return f"{what} has {size} bytes, manifest says {artifact['bytes']}: {uri}"
    if check_hashes and storage.sha256_object(fs, path, size) != artifact["sha256"]:
        return f"{what} does not match its sha256: {uri}"
    return None


def _stored_size(fs, path: str, recorded: int, shown: bool | None) -> int | None:
    """The size of the object at ``path``, None when there is none: ``recorded`` when the
    listing shows it so, or asked of the object where the listing cannot tell (one request)."""
    if shown is not None:
        return recorded if shown else None
    try:
        return fs.size(path)
    except FileNotFoundError:
        return None


