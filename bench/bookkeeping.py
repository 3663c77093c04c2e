"""Bookkeeping at scale: what the commands that read a committed output cost as its rows grow.

An output of ``--rows`` rows is committed by the do-nothing renderer of ``bench.driver_throughput``
(16 workers, shards of 64 rows: one manifest per shard), then each command a user runs on a
finished output is timed as a whole process, from launch to exit:

- ``render`` again on the same input (a nightly retry): nothing to do;
- ``status``; ``verify --no-hash`` (the metadata part of verify); ``report``.

    python -m bench.bookkeeping --rows 100000 [--rounds 3]
    python -m bench.bookkeeping --quick        # 2,000 rows, 1 round
    python -m bench.bookkeeping --rows 100000 --rounds 1 --status-runs 60   # the abort loop

``--synthetic`` writes the output with ``bench.synthetic_output`` instead (the same files a run
writes: shard manifests committed and folded into segments; videos only with ``--videos``, or
``--linked-videos``: hard links of a few files, which ten million of fit on a disk), for 1M and
10M rows, and adds ``plan`` on an input grown by a ninth (the output is 90% done: what a resume
reads before it renders). ``--baseline TREE`` times the same commands from another checkout
(an earlier commit) side by side, in interleaved rounds. ``--s3 ROWS`` counts each command's
requests on moto's S3 server, in process (a running job's: a shard committed after
``manifest.parquet``), and the most times any one manifest object was fetched.

    python -m bench.bookkeeping --synthetic --rows 10000000 --rounds 1
    python -m bench.bookkeeping --synthetic --videos --shards-too --rows 1000000
    python -m bench.bookkeeping --synthetic --linked-videos --rows 10000000 --baseline ../before
    python -m bench.bookkeeping --s3 20000
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
SYNTHETIC_COMMANDS = ("render", "plan", "status", "verify", "report")


def synthetic(rows: int, root: str, videos: bool, folded: bool, reuse: bool = False,
              linked: bool = False) -> tuple[str, dict]:
    """A synthetic finished output of ``rows`` rows (``folded`` into segments, or one manifest
    per shard as before segments; ``linked``: its videos hard links; ``reuse``: the one an
    earlier run left); each command's argv on it."""
    import shutil
    import time

    import fsspec

    from bench.synthetic_output import config_for, linked_files, write_output, write_prompts

    name = f"synthetic-{rows}-{'folded' if folded else 'shards'}{'-linked' if linked else ''}"
    out = os.path.join(root, name)
    prompts, grown = (os.path.join(root, f"{name}-{kind}.parquet") for kind in ("input", "grown"))
    if not (reuse and os.path.exists(os.path.join(out, "_SUCCESS"))):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(linked_files(out), ignore_errors=True)
        started = time.monotonic()
        write_output(prompts, out, rows, videos=videos, folded=folded, linked=linked)
        print(f"wrote {name} in {time.monotonic() - started:.0f} s", flush=True)
    write_prompts(fsspec.filesystem("file"), grown, rows * 10 // 9)
    configs = {}
    for kind, source in (("done", prompts), ("grown", grown)):
        configs[kind] = os.path.join(root, f"{name}-{kind}.yaml")
        with open(configs[kind], "w") as f:
            yaml.safe_dump(config_for(source, out), f)
    argvs = {"render": ["render", configs["done"], "--quiet"], "plan": ["plan", configs["grown"]],
             "status": ["status", out], "verify": ["verify", out, "--no-hash"],
             "report": ["report", out]}
    if not videos:
        del argvs["verify"]
    return out, argvs


def s3_requests(rows: int) -> dict:
    """Each command's S3 requests on an output of ``rows`` rows on moto's server."""
    import tempfile
    from collections import Counter

    import s3fs
    from moto.server import ThreadedMotoServer

    from bench.synthetic_output import config_for, write_output, write_prompts
    from jobs.cli import main as cli
    from jobs.store import fetched
    from rendering import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        out, prompts = "s3://bench/out", "s3://bench/prompts.parquet"
        write_output(prompts, out, rows, videos=True)
        _rewrite_live_shard(fs, out)
        with tempfile.TemporaryDirectory() as tmp:
            write_prompts(fs, "bench/prompts-grown.parquet", rows * 10 // 9)
            configs = {}
            for name, source in (("done", prompts), ("grown", "s3://bench/prompts-grown.parquet")):
                configs[name] = os.path.join(tmp, f"{name}.yaml")
                with open(configs[name], "w") as f:
                    yaml.safe_dump(config_for(source, out), f)
            fs_out, _ = storage.filesystem(out)
            fs_out.ls("bench")
            calls: Counter = Counter()
            gets: Counter = Counter()  # GETs of each manifest object (a Parquet input or
            # manifest.parquet is read in ranges: a GET each)

            def count(model, params, **_) -> None:
                calls.update([model.name])
                if model.name == "GetObject" and "/manifests/" in params["url_path"]:
                    gets.update([params["url_path"]])

            fs_out.s3.meta.events.register("before-call.s3", count)
            argvs = {"render": ["render", configs["done"], "--quiet"],
                     "plan": ["plan", configs["grown"]], "status": ["status", out],
                     "verify": ["verify", out, "--no-hash"], "report": ["report", out]}
            counts = {}
            for name, argv in argvs.items():
                calls.clear()
                gets.clear()
                fetched.clear()  # each command starts as a process does, with nothing kept
                cli(argv)
                most = max(gets.values(), default=0)
                counts[name] = dict(calls, total=calls.total(), most_gets_of_a_manifest=most)
                print(f"S3, {rows:,} rows: {name} {calls.total()} requests {dict(calls)}; "
                      f"a manifest object fetched at most {most} times", flush=True)
        return counts
    finally:
        server.stop()


def _rewrite_live_shard(fs, out: str) -> None:
    """A commit after the consolidation, as while a job runs (S3 stamps to the second): a
    live shard (no checkpoint absorbed it) written again, so that readers read the manifests."""
    import time

    from jobs.store import manifest

    shard = manifest.committed(out).shards[-1]
    time.sleep(1.1)
    fs.pipe_file(shard, fs.cat_file(shard))


def commit_output(rows: int, root: str) -> tuple[str, dict[str, list[str]]]:
    """A finished output of ``rows`` rows rendered by the do-nothing renderer; each command's
    argv on it."""
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
    return out, {"render": ["render", config, "--quiet"], "status": ["status", out],
                 "verify": ["verify", out, "--no-hash"], "report": ["report", out]}


# The command's own peak RSS, printed at its exit: VmHWM starts anew at exec, where a child's
# ru_maxrss keeps the high-water mark of the (large) bench process it was forked from.
_PEAK = ("import atexit; atexit.register(lambda: print('peak_rss_kb', open('/proc/self/status')"
         ".read().split('VmHWM:')[1].split()[0]))")


def time_commands(tree: str, argvs: dict[str, list[str]], memory: dict | None = None) -> dict:
    """Each command's wall time, run from the checkout ``tree`` (and its peak RSS, MB)."""
    times = {}
    for name in argvs:
        run = run_process([python(), "-c", f"import sys; sys.path.insert(0, {tree!r}); {_PEAK}; "
                                           f"from jobs.cli import main; sys.exit(main())",
                           *argvs[name]], timeout_s=3600)
        if run.returncode not in (0, 3):
            raise SystemExit(f"{name} from {tree} failed ({run.returncode}):\n{run.output[-2000:]}")
        times[name] = round(run.wall_s, 2)
        if memory is not None and "peak_rss_kb " in run.output:
            peak_mb = int(run.output.rsplit("peak_rss_kb ", 1)[1].split()[0]) / 1024
            memory[name] = max(memory.get(name, 0), round(peak_mb))
        print(f"{tree}: {name} {times[name]} s", flush=True)
    return times


def _newer_than_consolidated(out: str) -> None:
    """A commit after the consolidation, as while a job runs: its newest manifest restamped."""
    from jobs.store import manifest

    listed = manifest.committed(out)
    newest = max(listed.listing.values(), key=lambda info: info.get("mtime", 0))
    os.utime(newest["name"])


def status_exits(out: str, runs: int) -> dict[str, int]:
    """``reelfarm status`` run ``runs`` times on the shard manifests (a shard newer than
    ``manifest.parquet`` sends it there): how often it exited with each code. A loop to catch
    an abort at exit, which struck once in tens of runs on a loaded machine."""
    _newer_than_consolidated(out)
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
    parser.add_argument("--synthetic", action="store_true",
                        help="write the output without rendering (for millions of rows)")
    parser.add_argument("--videos", action="store_true", help="--synthetic: with video objects")
    parser.add_argument("--linked-videos", action="store_true",
                        help="--synthetic: with video objects, hard links of a few files")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also time the commands from this checkout, side by side")
    parser.add_argument("--shards-too", action="store_true",
                        help="--synthetic: also an output left in shards, timed side by side")
    parser.add_argument("--reuse", action="store_true",
                        help="--synthetic: time the outputs an earlier run wrote, if complete")
    parser.add_argument("--s3", type=int, metavar="ROWS", help="count S3 requests instead")
    parser.add_argument("--status-runs", type=int, default=0,
                        help="then run status this many times, counting its exit codes")
    args = parser.parse_args(argv)
    if args.s3:
        result = {"machine": machine(), "rows": args.s3, "requests": s3_requests(args.s3)}
        print("saved", save("bookkeeping_s3", result))
        return 0
    rows, rounds = args.rows or (2_000 if args.quick else 100_000), args.rounds or (1 if args.quick else 3)
    root = os.path.join(OUT, "bookkeeping")
    os.makedirs(root, exist_ok=True)
    videos = args.videos or args.linked_videos
    if args.synthetic:
        outputs = {"folded": synthetic(rows, root, videos, True, args.reuse, args.linked_videos)}
        if args.shards_too:
            outputs["shards"] = synthetic(rows, root, videos, False, args.reuse, args.linked_videos)
    else:
        outputs = {"run": commit_output(rows, root)}
    trees = {"": REPO, **({"baseline ": os.path.abspath(args.baseline)} if args.baseline else {})}
    contenders = [(tree + name, path, outputs[name][1]) for tree, path in trees.items()
                  for name in outputs]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    memory: dict[str, dict] = {name: {} for name, _, _ in contenders}
    for r in range(rounds):
        for name, tree, argvs in (contenders if r % 2 == 0 else list(reversed(contenders))):
            runs[name].append(time_commands(tree, argvs, memory[name]))
    if args.synthetic:  # a running job's status: manifest.parquet older than the last commit
        for name, tree, argvs in contenders:
            _newer_than_consolidated(argvs["status"][1])
            for run in runs[name]:
                run["status_running"] = time_commands(tree, {"status": argvs["status"]})["status"]
    summary = {name: {c: median([run[c] for run in group]) for c in group[0]}
               for name, group in runs.items()}
    out = next(iter(outputs.values()))[0]
    result = {"machine": machine(), "rows": rows, "shard_size": SHARD_SIZE, "rounds": rounds,
              "synthetic": args.synthetic, "videos": videos, "linked": args.linked_videos,
              "baseline": trees.get("baseline "), "runs": runs,
              "summary": summary, "peak_rss_mb": memory,
              "status_exits": status_exits(out, args.status_runs) if args.status_runs else None}
    print(json.dumps({"summary": summary, "peak_rss_mb": memory}, indent=2))
    print("saved", save("bookkeeping" + ("_quick" if args.quick else "")
                        + (f"_synthetic_{rows}" if args.synthetic else ""), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
