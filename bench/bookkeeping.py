"""Bookkeeping at scale: what the commands that read a committed output cost as its rows grow.

An output of ``--rows`` rows is committed by the do-nothing renderer of ``bench.driver_throughput``
(16 workers, shards of 64 rows: one manifest per shard), then each command a user runs on a
finished output is timed as a whole process, from launch to exit:

- ``render`` again on the same input (a nightly retry): nothing to do;
- ``status``; ``verify --no-hash`` (the metadata part of verify); ``report``.

``--before DIR`` runs the same commands from another checkout of reelfarm too (``git worktree add
DIR COMMIT``), interleaved round by round, so the two are compared side by side on one output.

    python -m bench.bookkeeping --rows 100000 [--before DIR] [--rounds 3]
    python -m bench.bookkeeping --quick        # 2,000 rows, 1 round
    python -m bench.bookkeeping --rows 100000 --rounds 1 --status-runs 60   # the abort loop
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

from bench.common import OUT, REPO, machine, median, python, run_process, save
from bench.driver_throughput import run_one, write_prompts

WORKERS, SHARD_SIZE = 16, 64
COMMANDS = ("render", "status", "verify", "report")


def commit_output(rows: int, root: str) -> tuple[str, str]:
    """A finished output of ``rows`` rows, and the config that made it."""
    from cluster.connect import connect

    logging.basicConfig(level=logging.WARNING)
    connect(None, num_cpus=WORKERS + 1)
    prompts = write_prompts(os.path.join(root, f"prompts-{rows}.parquet"), rows)
    out = os.path.join(root, f"out-{rows}")
    print(json.dumps(run_one(prompts, out, WORKERS, SHARD_SIZE)), flush=True)
    config = os.path.join(root, f"job-{rows}.yaml")
    with open(config, "w") as f:  # the settings run_one rendered with: the fingerprint matches
        yaml.safe_dump({"input": {"uri": prompts}, "model": {"path": "tiny:modelscope"},
                        "output": {"uri": out, "shard_size": SHARD_SIZE},
                        "cluster": {"num_workers": WORKERS, "cpus_per_worker": 1}}, f)
    return out, config


def time_commands(tree: str, out: str, config: str) -> dict[str, float]:
    """Each command's wall time, run from the checkout ``tree``."""
    argvs = {"render": ["render", config, "--quiet"], "status": ["status", out],
             "verify": ["verify", out, "--no-hash"], "report": ["report", out]}
    times = {}
    for name in COMMANDS:
        run = run_process([python(), "-c", f"import sys; sys.path.insert(0, {tree!r}); "
                                           f"from jobs.cli import main; sys.exit(main())",
                           *argvs[name]], timeout_s=3600)
        if run.returncode not in (0, 3):
            raise SystemExit(f"{name} from {tree} failed ({run.returncode}):\n{run.output[-2000:]}")
        times[name] = round(run.wall_s, 2)
        print(f"{tree}: {name} {times[name]} s", flush=True)
    return times


def status_exits(out: str, runs: int) -> dict[str, int]:
    """``reelfarm status`` run ``runs`` times on the shard manifests (a shard newer than
    ``manifest.parquet`` sends it there): how often it exited with each code. A loop to catch
    an abort at exit, which struck once in tens of runs on a loaded machine."""
    from jobs.store import manifest

    os.utime(manifest.shard_paths(out)[0])  # manifest.parquet is no longer current
    exits: dict[str, int] = {}
    for _ in range(runs):
        code = str(run_process([python(), "-m", "jobs.cli", "status", out]).returncode)
        exits[code] = exits.get(code, 0) + 1
    print("status exits:", exits, flush=True)
    return exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 1 round")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--before", help="another checkout of reelfarm, timed side by side")
    parser.add_argument("--status-runs", type=int, default=0,
                        help="then run status this many times, counting its exit codes")
    args = parser.parse_args(argv)
    rows, rounds = args.rows or (2_000 if args.quick else 100_000), args.rounds or (1 if args.quick else 3)
    root = os.path.join(OUT, "bookkeeping")
    os.makedirs(root, exist_ok=True)
    out, config = commit_output(rows, root)
    trees = {"this": REPO, **({"before": os.path.abspath(args.before)} if args.before else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            runs[name].append(time_commands(trees[name], out, config))
    summary = {name: {c: median([run[c] for run in group]) for c in COMMANDS}
               for name, group in runs.items()}
    result = {"machine": machine(), "rows": rows, "shard_size": SHARD_SIZE, "rounds": rounds,
              "trees": trees, "runs": runs, "summary": summary,
              "status_exits": status_exits(out, args.status_runs) if args.status_runs else None}
    print(json.dumps(summary, indent=2))
    print("saved", save("bookkeeping" + ("_quick" if args.quick else ""), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
