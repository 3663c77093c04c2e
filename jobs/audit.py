"""``reelfarm verify`` and ``reelfarm status``: read an output back and say what is in it."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from jobs import manifest
from jobs.output import read_job
from rendering import storage

_HASH_THREADS = 8  # hashing is I/O bound on object stores


@dataclass
class Audit:
    rows: int
    ok: int
    checked: int
    problems: list[str]


def verify(output_uri: str, check_hashes: bool = True) -> Audit:
    """Every ok row's video exists with its size and sha256; no video or temp file is unlisted."""
    fs, root = storage.filesystem(output_uri)
    if not fs.exists(root):
        return Audit(0, 0, 0, [f"output {output_uri} does not exist"])
    table = manifest.read_shards(output_uri)
    problems: list[str] = []
    if table.num_rows == 0:
        problems.append(f"no committed shard manifests under {output_uri}/{manifest.MANIFESTS_DIR}")
    rows = table.to_pylist()
    keys = Counter((r["id"], r["occurrence"]) for r in rows)
    problems += [f"row {k[0]!r} is committed {n} times" for k, n in keys.items() if n > 1]

    ok_rows = [r for r in rows if r["status"] == "ok"]
    listed = {_path(r["video_uri"]) for r in ok_rows}
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for problem in pool.map(lambda r: _check_video(r, check_hashes), ok_rows):
            if problem:
                problems.append(problem)

    videos_dir = storage.join(root, manifest.VIDEOS_DIR)
    present = fs.find(videos_dir) if fs.exists(videos_dir) else []
    for path in sorted(present):
        if storage.TEMP_MARKER in path.rsplit("/", 1)[-1]:
            problems.append(f"leftover temporary object {path}")
        elif path not in listed:
            problems.append(f"video {path} is not in any manifest")
    for path in sorted(fs.find(root)):
        name = path.rsplit("/", 1)[-1]
        if storage.TEMP_MARKER in name and not path.startswith(videos_dir + "/"):
            problems.append(f"leftover temporary object {path}")

    success = fs.exists(storage.join(root, manifest.SUCCESS_FILE))
    job = read_job(output_uri) or {}
    expected = job.get("counts", {}).get("rows")
    if success and expected is not None and expected != table.num_rows:
        problems.append(f"_SUCCESS is present but {table.num_rows} of {expected} rows are committed")
    consolidated = storage.join(root, manifest.MANIFEST_FILE)
    if success and not fs.exists(consolidated):
        problems.append(f"_SUCCESS is present but {manifest.MANIFEST_FILE} is missing")
    return Audit(table.num_rows, len(ok_rows), len(ok_rows), problems)


def status(output_uri: str, top: int = 5) -> dict:
    """Counts by status, the most common errors, and the last run's figures."""
    fs, root = storage.filesystem(output_uri)
    counts = manifest.tally(output_uri)
    job = read_job(output_uri) or {}
    return {"rows": counts.rows, "by_status": dict(counts.by_status),
            "top_errors": counts.top_errors(top),
            "expected_rows": job.get("counts", {}).get("rows"),
            "last_run": job.get("last_run"),
            "complete": fs.exists(storage.join(root, manifest.SUCCESS_FILE))}


def _path(uri: str) -> str:
    return storage.filesystem(uri)[1]


def _check_video(row: dict, check_hashes: bool) -> str | None:
    uri = row["video_uri"]
    fs, path = storage.filesystem(uri)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return f"video of row {row['id']!r} is missing: {uri}"
    if size != row["bytes"]:
        return f"video of row {row['id']!r} has {size} bytes, manifest says {row['bytes']}: {uri}"
    if check_hashes and storage.sha256_object(fs, path) != row["sha256"]:
        return f"video of row {row['id']!r} does not match its sha256: {uri}"
    return None
