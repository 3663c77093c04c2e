"""Driver scale, part 1: ``reelfarm plan`` over a generated 10-million-row dataset.

Times the whole ``reelfarm plan`` process and reads its peak RSS (targets: under 20 s and
300 MB). For comparison it also times the row-by-row planner (``plan_rows``, what ``render``
streams through) over the first file. That ``count_plan`` (what ``plan`` uses) counts exactly
what ``plan_rows`` counts is checked by tests/test_jobs/input/test_plan_count.py.

    python -m bench.plan_scale            # 10,000,000 rows in 10 files, 3 runs
    python -m bench.plan_scale --quick    # 200,000 rows, 1 run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from bench.common import OUT, machine, median, python, run_process, save

ROWS_PER_FILE = 1_000_000
ROW_GROUP_ROWS = 65_536  # as a Spark or pandas export would cut them; matches input.batch_rows
DUPLICATE_EVERY = 100_000  # a few repeated ids, as real datasets have


def generate(directory: str, rows: int) -> str:
    """``rows`` prompts with string ids, in files of up to a million rows (cached on disk)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    marker = os.path.join(directory, f"_rows-{rows}")
    if os.path.exists(marker):
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    subjects = pa.array(["a red fox running through snow", "an old lighthouse in a storm",
                         "a paper boat on a rainy street", "a city tram at night, neon signs",
                         "a snow owl taking off", "time-lapse of clouds over a desert road"])
    for start in range(0, rows, ROWS_PER_FILE):
        index = np.arange(start, min(rows, start + ROWS_PER_FILE))
        id_numbers = np.where(index % DUPLICATE_EVERY == DUPLICATE_EVERY - 1, index - 1, index)
        ids = pc.binary_join_element_wise("clip-", pc.cast(pa.array(id_numbers), pa.string()), "")
        prompts = pc.binary_join_element_wise(
            pc.take(subjects, pa.array(index % len(subjects))), ", take ",
            pc.cast(pa.array(index), pa.string()), "")
        table = pa.table({"id": ids, "prompt": prompts})
        pq.write_table(table, os.path.join(directory, f"part-{start // ROWS_PER_FILE:03d}.parquet"),
                       row_group_size=ROW_GROUP_ROWS)
    open(marker, "w").close()
    return directory


def write_config(path: str, input_uri: str, output_uri: str) -> str:
    with open(path, "w") as f:
        f.write(f"input: {{uri: {json.dumps(input_uri)}}}\n"
                f"model: {{path: 'tiny:modelscope'}}\n"
                f"output: {{uri: {json.dumps(output_uri)}, shard_size: 64}}\n")
    return path


_ROW_BY_ROW = """
import sys, time
from jobs.config import load_config
from jobs.input.dataset import open_dataset
from jobs.store.hashset import HashSet
from jobs.input.plan import PlanCounts, plan_rows
cfg = load_config(sys.argv[1], [f"input.uri={sys.argv[2]}"])
started = time.monotonic()
counts = PlanCounts()
for _ in plan_rows(open_dataset(cfg.input.uri, []), cfg, HashSet(), counts):
    pass
print(counts.rows, time.monotonic() - started)
"""


def run(rows: int, repeats: int, root: str) -> dict:
    data = generate(os.path.join(root, f"data-{rows}"), rows)
    config = write_config(os.path.join(root, "plan.yaml"), data, os.path.join(root, "no-output"))
    runs = []
    for r in range(repeats):
        proc = run_process([python(), "-m", "jobs.cli", "plan", config])
        if proc.returncode != 0:
            raise RuntimeError(f"reelfarm plan failed: {proc.output[-2000:]}")
        runs.append({"wall_s": round(proc.wall_s, 2), "peak_rss_mb": round(proc.peak_rss_mb, 1)})
        print(f"run {r}: reelfarm plan over {rows:,} rows: {proc.wall_s:.1f} s, "
              f"peak RSS {proc.peak_rss_mb:.0f} MB", flush=True)
    printed = proc.output.strip()
    first = sorted(p for p in os.listdir(data) if p.endswith(".parquet"))[0]
    first_rows = min(rows, ROWS_PER_FILE)
    old = run_process([python(), "-c", _ROW_BY_ROW, config, os.path.join(data, first)])
    if old.returncode != 0:
        raise RuntimeError(f"row-by-row planning failed: {old.output[-2000:]}")
    old_s = float(old.output.split()[-1])
    print(f"row by row (plan_rows) over {first_rows:,} rows: {old_s:.1f} s, "
          f"peak RSS {old.peak_rss_mb:.0f} MB", flush=True)
    return {"machine": machine(), "rows": rows, "files": len(os.listdir(data)) - 1,
            "row_group_rows": ROW_GROUP_ROWS, "runs": runs,
            "median_wall_s": median(r["wall_s"] for r in runs),
            "median_peak_rss_mb": median(r["peak_rss_mb"] for r in runs),
            "plan_output": printed,
            "row_by_row": {"rows": first_rows, "seconds": old_s,
                           "peak_rss_mb": round(old.peak_rss_mb, 1),
                           "projected_s_for_all_rows": round(old_s * rows / first_rows, 1)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 rows, one run")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    rows = args.rows or (200_000 if args.quick else 10_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    name = "plan_scale" + ("_quick" if args.quick else "")
    result = run(rows, repeats, os.path.join(OUT, "plan_scale"))
    print(json.dumps({k: result[k] for k in ("rows", "median_wall_s", "median_peak_rss_mb",
                                             "row_by_row")}, indent=2))
    print("saved", save(name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
