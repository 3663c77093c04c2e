"""A committed output of millions of rows, written the way a run writes it, without rendering.

Each shard is committed by ``manifest.write_shard`` and folded by ``segments.Folder`` (as the
driver does); ``job.json`` and ``_SUCCESS`` come from ``job_file``. What is not made: the
cluster, and the videos unless asked for: tiny objects, or on local disk hard links of a few
files (``linked``), since ten million files would take 40 GB and most of a disk's inodes.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SIZE = 64
VIDEO_BYTES = 16
LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one file


def config_for(prompts: str, out: str) -> dict:
    return {"input": {"uri": prompts}, "model": {"path": "tiny:modelscope"},
            "output": {"uri": out, "shard_size": SHARD_SIZE},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1}}


def write_prompts(fs, path: str, rows: int) -> None:
    table = pa.table({"id": pa.array([f"row-{i:08d}" for i in range(rows)]),
                      "prompt": pa.array([f"a scene, take {i}" for i in range(rows)])})
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=1 << 20)


def write_output(prompts: str, out: str, rows: int, videos: bool = False, folded: bool = True,
                 progress=print, linked: bool = False) -> None:
    """Commit ``rows`` rows to ``out``, ``folded`` into segments as a run does (or left in
    shards, as before segments existed); with ``videos``, a video object per row, stored
    before its row is committed (``linked``: hard links, on local disk, of files kept in the
    folder ``linked_files(out)``, outside the output)."""
    from jobs.config import validate
    from jobs.input.dataset import open_dataset, signature
    from jobs.store import job_file, manifest, segments
    from rendering import storage

    fs, root = storage.filesystem(out)
    write_prompts(fs, prompts.split("://", 1)[-1] if "://" in prompts else prompts, rows)
    cfg = validate(config_for(prompts, out))
    fs.makedirs(storage.join(root, "videos"), exist_ok=True)
    if linked:
        os.makedirs(linked_files(out), exist_ok=True)
    job = job_file.start_job(cfg, None, rows)
    folder = segments.Folder(out, segments.SEGMENT_SHARDS if folded else rows + 1)
    # A run commits a shard a second or so; this writer hundreds: absorbed shards are deleted
    # after a second, not a minute, so that what is left is what a run leaves.
    segments.RETENTION_S = 1.0
    started = time.monotonic()
    for start in range(0, rows, SHARD_SIZE):
        records = [_record(i) for i in range(start, min(start + SHARD_SIZE, rows))]
        if videos and linked:
            for r in records:
                if r["row_index"] % LINKS_PER_FILE == 0:
                    linked_to = os.path.join(linked_files(out), f"{r['row_index']}.mp4")
                    with open(linked_to, "wb") as f:
                        f.write(b"v" * VIDEO_BYTES)
                os.link(linked_to, storage.join(root, r["video_uri"]))
        elif videos:
            fs.pipe({storage.join(root, r["video_uri"]): b"v" * r["bytes"] for r in records})
        folder.committed(*manifest.write_shard(out, records))
        if start % (SHARD_SIZE * 2000) == 0 and start:
            progress(f"{start:,} rows committed, {time.monotonic() - started:.0f} s")
    folder.fold_listed()  # as the driver ends a run
    tally = manifest.consolidate(out)
    counts = {"rows": tally.rows, "ok": tally.ok, "failed": tally.rows - tally.ok,
              "committed": tally.rows}
    job_file.finish_job(cfg, job, "finished", counts, {}, complete=True,
                        input_signature=signature(open_dataset(prompts, [])))


def linked_files(out: str) -> str:
    """Where the files ``linked`` video objects are links of are kept: beside the output."""
    return f"{out}-linked"


def _record(i: int) -> dict:
    path = f"videos/row-{i:08d}.mp4"
    artifact = {"name": "video", "path": path, "bytes": VIDEO_BYTES, "sha256": "0" * 64,
                "kind": "video"}
    return {"id": f"row-{i:08d}", "row_index": i, "occurrence": 0, "prompt": f"a scene, take {i}",
            "status": "ok", "video_uri": path, "bytes": VIDEO_BYTES, "sha256": "0" * 64,
            "seed": i, "num_frames": 8, "height": 32, "width": 32, "fps": 8,
            "artifacts": [artifact], "attempts": 1, "render_s": 0.01,
            "stages": [{"name": "video", "status": "ok", "attempts": 1, "seconds": 0.01,
                        "height": 32, "width": 32, "node_id": None, "gpu_ids": None}]}
