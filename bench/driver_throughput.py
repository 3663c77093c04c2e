"""Driver scale, part 2: the driver's own throughput, with a render step that does nothing.

Many workers answer every shard at once with "ok" (no model, no video), so the only work left
is the driver's: streaming and resolving rows, cutting shards, scheduling them over Ray,
committing one manifest per shard, consolidating at the end. Rows per second here is the most
the driver could ever commit; a real job needs far fewer (a GPU makes a video in seconds to
minutes), so the driver is never the bottleneck when this is orders of magnitude higher.

The do-nothing renderer lives here, not in the package: ``WorkerPool(worker_class=...)``
is the one injection point.

    python -m bench.driver_throughput            # 100,000 rows, 16 workers, shards of 64 and 8
    python -m bench.driver_throughput --quick    # 2,000 rows, 4 workers
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time

from bench.common import OUT, machine, save
from rendering import storage
from rendering.contract import Artifact, Result, Task
from rendering.worker import ShardRenderer


class NoopRenderer(ShardRenderer):
    """ShardRenderer's interface, minus the work: every row comes back ok at once."""

    def setup(self) -> dict:
        return {"device": "noop", "pid": os.getpid(), "load_s": 0.0}

    def placement(self) -> dict:
        return {"node_id": None, "gpu_ids": []}

    def render_shard(self, tasks: list[Task]) -> list[Result]:
        return [Result(id=t.id, ok=True, artifacts=[stored_empty(self, "video", t.key, "mp4")])
                for t in tasks]


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def stored_empty(renderer: ShardRenderer, name: str, key: str, ext: str) -> Artifact:
    """An empty object stored where the renderer's real artifact would go: the driver lists
    every committed artifact before it calls an output complete, as it does for real ones."""
    relative = f"{renderer.spec.artifact_dir}/{key}.{ext}"
    storage.write_bytes(renderer._fs, storage.join(renderer._root, relative), b"")
    return Artifact(name, relative, 0, EMPTY_SHA256, "image" if ext == "png" else "video")


def write_prompts(path: str, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"row-{i:08d}" for i in range(rows)],
                             "prompt": [f"a scene, take {i}" for i in range(rows)]}), path)
    return path


def run_one(prompts: str, output: str, workers: int, shard_size: int) -> dict:
    import cluster.pool
    from jobs.config import load_config
    from jobs.driver import render

    shutil.rmtree(output, ignore_errors=True)
    cfg = load_config(None, base={
        "input": {"uri": prompts}, "model": {"path": "tiny:modelscope"},
        "output": {"uri": output, "shard_size": shard_size},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1}})
    real_pool = cluster.pool.WorkerPool
    cluster.pool.WorkerPool = functools.partial(real_pool, worker_class=NoopRenderer)
    try:
        wall0, cpu0 = time.monotonic(), time.process_time()
        summary = render(cfg, progress=False)
        wall1, cpu1 = time.monotonic(), time.process_time()
    finally:
        cluster.pool.WorkerPool = real_pool
    steady_s = summary.rendering_s  # from the workers being ready to the last commit
    assert summary.ok == summary.total_rows, summary
    return {"rows": summary.total_rows, "workers": workers, "shard_size": shard_size,
            "wall_s": round(wall1 - wall0, 2), "pool_start_s": round(summary.startup_s, 2),
            "after_start_s": round(steady_s, 2),
            "rows_per_s": round(summary.total_rows / steady_s, 1),
            "shards_per_s": round(math.ceil(summary.total_rows / shard_size) / steady_s, 1),
            "driver_cpu_s": round(cpu1 - cpu0, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 4 workers")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    rows = args.rows or (2_000 if args.quick else 100_000)
    workers = args.workers or (4 if args.quick else 16)
    shard_sizes = args.shard_sizes or ([64] if args.quick else [64, 8])
    logging.basicConfig(level=logging.WARNING)

    import ray

    from cluster.connect import connect

    # Enough logical CPUs for every do-nothing worker to hold one, as on a big cluster.
    connect(None, num_cpus=workers + 1)
    root = os.path.join(OUT, "driver_throughput")
    os.makedirs(root, exist_ok=True)
    prompts = write_prompts(os.path.join(root, f"prompts-{rows}.parquet"), rows)
    results = []
    for shard_size in shard_sizes:
        result = run_one(prompts, os.path.join(root, f"out-{shard_size}"), workers, shard_size)
        print(json.dumps(result), flush=True)
        results.append(result)
    ray.shutdown()
    name = "driver_throughput" + ("_quick" if args.quick else "")
    print("saved", save(name, {"machine": machine(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
