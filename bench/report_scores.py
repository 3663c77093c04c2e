"""The report over a large scored output: what showing every score costs, side by side.

An output of ``--rows`` committed rows with every score column (``clip_score``,
``aesthetic_score``, ``motion_score``, ``motion_static``), the gate's columns and
``duplicate_of``, written as 50k-row shard manifests and consolidated into ``manifest.parquet``
as a finished run leaves it; then ``reelfarm report`` as a whole process from this tree and,
with ``--before``, from an earlier checkout, interleaved over ``--rounds`` rounds: wall time
and peak RSS (medians), and the size of the page each wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from bench.bookkeeping import time_commands
from bench.common import REPO, machine, median, save

SHARD_ROWS = 50_000
RULES = ("clip_score >= 25", "motion_score >= 0.5")  # as quality_failed_rules names them


def write_output(folder: str, rows: int, seed: int = 0) -> None:
    """Shard manifests of ``rows`` rows (1 in 25 failed), scored, gated and deduplicated, then
    ``manifest.parquet`` and ``job.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.store import layout, manifest

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, layout.MANIFESTS_DIR))
    for n, start in enumerate(range(0, rows, SHARD_ROWS)):
        index = np.arange(start, min(start + SHARD_ROWS, rows))
        count = len(index)
        failed = index % 25 == 24
        clip = np.where(failed, np.nan, rng.uniform(15, 40, count))
        motion = np.where(failed, np.nan, rng.exponential(1.0, count))
        misses = np.stack([clip < 25, motion < 0.5], axis=1)  # NaN compares False
        lengths = misses.sum(axis=1)
        tries = np.where(misses[:, 0], 3, 1)
        ids = [f"row-{i:08d}" for i in index.tolist()]
        columns = {f.name: pa.nulls(count, f.type) for f in manifest.SCHEMA}
        columns.update(
            id=pa.array(ids), row_index=pa.array(index, pa.int64()),
            occurrence=pa.array(np.zeros(count, np.int32)),
            prompt=pa.array([f"a scene, take {i}" for i in index.tolist()]),
            status=pa.array(np.where(failed, "failed", "ok")),
            error_code=pa.array([None if not f else "render_error" for f in failed.tolist()]),
            video_uri=pa.array([None if f else f"videos/{i}.mp4"
                                for i, f in zip(ids, failed.tolist())]),
            seed=pa.array(index, pa.int64()), committed_at=pa.array(np.full(count, 1.7e9 + n)),
            clip_score=pa.array(clip, from_pandas=True),
            aesthetic_score=pa.array(np.where(failed, np.nan, rng.normal(5, 1, count)),
                                     from_pandas=True),
            motion_score=pa.array(motion, from_pandas=True),
            motion_static=pa.array(motion < 0.2, mask=failed),
            quality_passed=pa.array(lengths == 0),
            quality_failed_rules=pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()),
                pa.array(np.array(RULES)[np.nonzero(misses)[1]])),
            quality_tries=pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(tries)]), pa.int32()),
                pa.StructArray.from_arrays(
                    [pa.array(np.arange(tries.sum()), pa.int64()),
                     pa.array(rng.uniform(15, 40, tries.sum()))], ["seed", "clip_score"])),
            quality_kept_try=pa.array(tries - 1, pa.int32()),
            duplicate_of=pa.array([f"row-{i - 1:08d}" if i % 100 == 7 and not f else None
                                   for i, f in zip(index.tolist(), failed.tolist())]))
        table = pa.table([columns[f.name] for f in manifest.SCHEMA], schema=manifest.SCHEMA)
        pq.write_table(table, os.path.join(folder, layout.MANIFESTS_DIR,
                                           f"{layout.SHARD_PREFIX}{n:06d}.parquet"))
    manifest.consolidate(folder)
    job = {"fingerprint": "bench", "counts": {"rows": rows},
           "config": {"model": {"path": "tiny:modelscope"},
                      "quality": {"clip_model": "tiny:clip", "min_score": 25, "on_fail": "retry",
                                  "rules": [{"column": "motion_score", "min": 0.5,
                                             "on_fail": "keep"}]}}}
    with open(os.path.join(folder, layout.JOB_FILE), "w") as f:
        json.dump(job, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", metavar="CHECKOUT", help="an earlier tree, run side by side")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 20_000, 1
    trees = {"now": REPO, **({"before": os.path.abspath(args.before)} if args.before else {})}
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-report-") as folder:
        write_output(folder, args.rows)
        times = {name: [] for name in trees}
        memory = {name: {} for name in trees}
        pages = {}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                times[name].append(time_commands(tree, {"report": ["report", folder]},
                                                 memory[name])["report"])
                pages[name] = os.path.getsize(os.path.join(folder, "report.html"))
    result = {"machine": machine(), "rows": args.rows, "rounds": args.rounds,
              "trees": {name: {"wall_s": round(median(times[name]), 2),
                               "peak_rss_mb": memory[name].get("report"),
                               "page_kb": round(pages[name] / 1024, 1)} for name in trees}}
    print(json.dumps(result, indent=2))
    print(f"saved {save('report_scores', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
