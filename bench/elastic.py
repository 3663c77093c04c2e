"""Elastic capacity on a simulated multi-node cluster (``ray.cluster_utils``: nodes with fake
GPUs; the tiny model renders on the CPU), each job a ``reelfarm render`` driver of its own:

1. join: a second GPU node joins mid-job. Seconds from the join to its worker placed, to its
   model loaded and to its first shard committed; rows/s committed before and after.
2. tail: the first worker to get the job's last row sleeps ``SLOW_S`` before it (a slow GPU,
   a sick node), with backup copies on and off: the job's wall time, and the idle
   worker-seconds at the tail (per node: from its last commit to the job's end).
3. preemption: a node removed mid-job: rows rendered again (the lost shards' rows) against the
   bound a loss can cost (``shards_in_flight_per_worker`` x ``shard_size`` per worker).

    python -m bench.elastic           # 3 rounds
    python -m bench.elastic --quick   # 1 round, faster rows (enough that the joined node
                                      # takes some), a shorter straggler, no tail without
                                      # backups: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime

from bench.common import OUT, REPO, machine, median, python, save
from bench.driver_throughput import write_prompts

SLOW_S = 20.0
SHARD_SIZE = 2
IN_FLIGHT = 2  # cluster.shards_in_flight_per_worker, its default
# Rows and denoising steps per phase. Quick: the join's rows outlast the joined node's worker
# start (10 to 15 s on a busy 2-core machine), the straggler sleeps several shard times, and the
# removed node's worker still holds shards when it goes.
SIZES = {"full": {"join": (48, 16), "tail": (8, 8), "slow_s": SLOW_S, "preemption": (48, 16)},
         "quick": {"join": (48, 4), "tail": (8, 4), "slow_s": 4.0, "preemption": (24, 8)}}

# ``reelfarm render`` with one slow worker: the first to get the row argv[2] sleeps argv[3]
# seconds before it (a slow GPU or node, say); argv[1] is the marker file it claims. Run as a
# driver's __main__, Ray ships the class to the workers by value. (The tests use it too.)
SLOW_WORKER_DRIVER = """
import os, sys, time
import ray
import cluster.pool as pool
from cluster.actor import ACTOR_OPTIONS, PlacedRenderer
from jobs.cli import main

marker, slow_id, sleep_s = sys.argv.pop(1), sys.argv.pop(1), float(sys.argv.pop(1))

class SlowOnce(PlacedRenderer):
    def render_shard(self, tasks):
        if any(task.id == slow_id for task in tasks):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                time.sleep(sleep_s)
            except FileExistsError:
                pass
        return super().render_shard(tasks)

pool.RenderActor = ray.remote(**ACTOR_OPTIONS)(SlowOnce)
sys.exit(main())
"""


def _job(folder: str, rows: int, steps: int, *sets: str) -> list[str]:
    """The render arguments of an elastic job of ``rows`` tiny rows, one GPU per worker."""
    os.makedirs(folder, exist_ok=True)
    prompts = write_prompts(os.path.join(folder, "prompts.parquet"), rows)
    settings = [f"output.shard_size={SHARD_SIZE}", f"render.num_inference_steps={steps}",
                "render.batch_size=1", "cluster.num_workers=null", "cluster.gpus_per_worker=1",
                "render.num_frames=8",
                "cluster.shard_timeout_s=600", *sets]
    return ["render", "configs/demo.yaml", "--input", prompts, "--output",
            os.path.join(folder, "out"), "--quiet", *[a for s in settings for a in ("--set", s)]]


def _start(folder: str, address: str, args: list[str], slow_id: str = "", sleep_s: float = 0):
    log = open(os.path.join(folder, "driver.log"), "w")
    argv = [python(), "-c", SLOW_WORKER_DRIVER, os.path.join(folder, "slow.marker"), slow_id,
            str(sleep_s), *args, "--address", address]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)


def _log(folder: str) -> str:
    with open(os.path.join(folder, "driver.log")) as f:
        return f.read()


def _logged_at(log: str, text: str) -> float | None:
    """When the first line holding ``text`` was logged (seconds since the epoch)."""
    line = next((line for line in log.splitlines() if text in line), None)
    return None if line is None else datetime.strptime(
        line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _rows(folder: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(folder, "out", "manifest.parquet")).to_pylist()


def _wait(predicate, timeout_s: float, proc) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the job ended or stalled before the benchmark's event")
        time.sleep(0.1)


def _finish(proc, folder: str, timeout_s: float = 600) -> None:
    if proc.wait(timeout_s) != 0:
        raise RuntimeError(f"the job failed:\n{_log(folder)[-3000:]}")


def _commits(folder: str) -> int:
    manifests = os.path.join(folder, "out", "manifests")
    return len(os.listdir(manifests)) if os.path.isdir(manifests) else 0


def join(cluster, folder: str, rows: int, steps: int) -> dict:
    """A second node joins once the first has committed a few shards."""
    first = cluster.add_node(num_cpus=2, num_gpus=1)
    proc = _start(folder, cluster.address, _job(folder, rows, steps))
    _wait(lambda: _commits(folder) >= 3, 300, proc)
    joined_at = time.time()
    second = cluster.add_node(num_cpus=2, num_gpus=1)
    _finish(proc, folder)
    log, table = _log(folder), _rows(folder)
    on_second = sorted(r["committed_at"] for r in table
                       if r["stages"][0]["node_id"] == second.node_id)
    before = [r["committed_at"] for r in table if r["committed_at"] <= joined_at]
    after = [r["committed_at"] for r in table if r["committed_at"] > (on_second or [joined_at])[0]]
    placed, loaded = (_logged_at(log, text) for text in
                      ("more worker(s) appeared", "loaded its model on node"))
    for node in (first, second):
        cluster.remove_node(node)
    return {"rows": rows,
            "join_to_placed_s": _since(placed, joined_at),
            "join_to_loaded_s": _since(loaded, joined_at),
            "join_to_first_commit_s": _since(on_second[0] if on_second else None, joined_at),
            "rows_on_joined_node": len(on_second),
            "rows_per_s_before": _rate(before), "rows_per_s_after": _rate(after)}


def tail(cluster, folder: str, rows: int, steps: int, backups: bool, slow_s: float) -> dict:
    """Two nodes; the first worker to get the last row sleeps ``slow_s`` before it."""
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    started = time.time()
    args = _job(folder, rows, steps, f"cluster.backups={str(backups).lower()}")
    proc = _start(folder, cluster.address, args, f"row-{rows - 1:08d}", slow_s)
    _finish(proc, folder)
    ended = time.time()
    table = _rows(folder)
    last_commit: dict[str, float] = {}
    for row in table:
        node = row["stages"][0]["node_id"]
        last_commit[node] = max(last_commit.get(node, 0.0), row["committed_at"])
    with open(os.path.join(folder, "out", "job.json")) as f:
        capacity = json.load(f)["last_run"].get("capacity", {})
    for node in nodes:
        cluster.remove_node(node)
    end = max(last_commit.values())
    return {"rows": rows, "backups": backups, "wall_s": round(ended - started, 2),
            "idle_worker_s_at_tail": round(sum(end - t for t in last_commit.values()), 2),
            "backups_taken": capacity.get("backups", 0),
            "backups_first": capacity.get("backups_first", 0)}


def preemption(cluster, folder: str, rows: int, steps: int) -> dict:
    """Three nodes; one is removed once its worker takes shards and a few are committed."""
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    proc = _start(folder, cluster.address, _job(folder, rows, steps))
    _wait(lambda: _commits(folder) >= 3 and _log(folder).count("loaded its model on node") >= 2,
          300, proc)
    cluster.remove_node(nodes[1])
    _finish(proc, folder)
    lost = [int(n) for n in re.findall(r"lost with its node; (?:started worker \d+, )?(\d+) "
                                       r"shard\(s\) to retry", _log(folder))]
    for node in (nodes[0], nodes[2]):
        cluster.remove_node(node)
    return {"rows": rows, "nodes_lost": len(lost), "rows_rendered_again": sum(lost) * SHARD_SIZE,
            "bound_per_lost_worker": IN_FLIGHT * SHARD_SIZE,
            "attempts_spent": max(r["attempts"] for r in _rows(folder)) - 1}


def _since(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 2)


def _rate(times: list[float]) -> float | None:
    """Rows per second over a run of commit times (None for fewer than two shards' worth)."""
    if len(times) < 2 * SHARD_SIZE or max(times) <= min(times):
        return None
    return round((len(times) - SHARD_SIZE) / (max(times) - min(times)), 3)


def main(argv: list[str] | None = None) -> int:
    from ray.cluster_utils import Cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 round, fewer and faster rows, a shorter straggler")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = SIZES["quick" if args.quick else "full"]
    slow_s = sizes["slow_s"]
    root = os.path.join(OUT, "elastic" + ("_quick" if args.quick else ""))
    shutil.rmtree(root, ignore_errors=True)
    runs: dict[str, list[dict]] = {"join": [], "tail_backups": [], "tail_no_backups": [],
                                   "preemption": []}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        for r in range(rounds):
            print(f"round {r + 1} of {rounds}", flush=True)
            runs["join"].append(join(cluster, os.path.join(root, f"join-{r}"), *sizes["join"]))
            for backups in (True,) if args.quick else (True, False):  # quick: the code path
                name = "tail_backups" if backups else "tail_no_backups"
                runs[name].append(tail(cluster, os.path.join(root, f"{name}-{r}"),
                                       *sizes["tail"], backups, slow_s))
            runs["preemption"].append(preemption(cluster, os.path.join(root, f"loss-{r}"),
                                                 *sizes["preemption"]))
            print(json.dumps({k: v[-1] for k, v in runs.items() if v}), flush=True)
    finally:
        cluster.shutdown()
    summary = {name: {key: median([run[key] for run in group]) for key in group[0]
                      if isinstance(group[0][key], (int, float)) and key != "backups"}
               for name, group in runs.items() if group}
    result = {"machine": machine(), "rounds": rounds, "slow_s": slow_s, "runs": runs,
              "summary": summary}
    print(json.dumps(summary, indent=2))
    print("saved", save("elastic" + ("_quick" if args.quick else ""), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
