"""Multi-stage jobs side by side: reelfarm's stage pools vs the same stages chained in Ray Data.

Two workloads, each a keyframe stage then a video stage, on a local Ray cluster:

- ``sleep``: do-nothing workers that sleep 0.05 s a row in the keyframe stage and 0.2 s a row in
  the video stage (1:4), 5 workers of 0.25 CPU in all (1 + 4 is the balanced split). reelfarm
  runs with stage weights 1:4 (the balancer's first split is already right) and, as
  ``reelfarm-misweighted``, with weights 1:1 (the rebalancer has to move workers once it has
  measured the stages). Ray Data runs ``read_parquet -> map_batches(keyframe actors) ->
  map_batches(video actors) -> write_parquet`` with the same 1 + 4 actors (``raydata``), and
  with its own autoscaling, ``concurrency=(1, 4)`` per stage (``raydata-auto``).
- ``tiny``: real pipelines, tiny:sd then tiny:ltx-i2v at 32x32, 9 frames, 2 steps; 1 worker of
  1 CPU per stage. reelfarm stores each keyframe PNG and the next stage reads it back; the Ray
  Data actors load the same pipelines, store the same PNGs and MP4s, and hand the keyframe's
  pixels to the next stage in memory.

Each run is its own process. Every worker appends its busy intervals (wall-clock: while it holds
a shard or batch; for the sleeping workers, while they sleep) to a file of its own; from them:

- rate: rows the video stage finished after its first shard, over the time from that first
  shard to its last (start-up and the first pass through the stages left out);
- busy: the share of that window, up to the first worker of the slowest stage running out of
  work for good, that the slowest stage's workers held a shard or batch;
- peak RSS of the driver process alone, sampled by a thread (``wait4`` would also count the
  Ray processes the driver started and reaped).

Rounds interleave the contenders (rotating their order) and the report gives medians.

    python -m bench.stages            # 400 rows of each workload, 3 rounds
    python -m bench.stages --quick    # a smoke run: few rows, one round
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time

from bench.common import OUT, has_pandas, machine, python, run_process, save
from bench.driver_throughput import stored_empty, write_prompts
from bench.stage_figures import STAGES, measure, outputs_digest, read_busy, summarize
from rendering.contract import Result, Task
from rendering.worker import ShardRenderer

SLEEP_S = {"keyframe": 0.05, "video": 0.2}  # per row: 1:4
SLEEP_CPUS = 0.25  # sleeping needs no CPU; 5 workers fit on the machine
SLEEP_WORKERS = 5
SLEEP_SPLIT = (1, 4)  # the balanced split for 1:4; Ray Data's fixed concurrency
SLEEP_SHARD = 4
TINY_SHARD = 2
CONTENDERS = {"sleep": ("reelfarm", "reelfarm-misweighted", "raydata", "raydata-auto"),
              "tiny": ("reelfarm", "raydata")}
QUICK = {"sleep": ("reelfarm",), "tiny": ("reelfarm", "raydata")}
WEIGHTS = {"reelfarm": (1, 4), "reelfarm-misweighted": (1, 1)}
BUSY_ENV = "REELFARM_BENCH_BUSY_DIR"  # where reelfarm's workers log (their spec cannot say)


# --- what every worker records --------------------------------------------------------------

class BusyLog:
    """One worker's busy intervals, appended to a file of its own (stage and pid in the name)."""

    def __init__(self, folder: str, stage: str):
        self.path = os.path.join(folder, f"{stage}-{os.getpid()}.log")

    def born(self) -> None:
        """The worker is ready (its model loaded): from here on, idle time counts."""
        self._write(f"born {time.time()}")

    def busy(self, start: float, end: float, rows: int) -> None:
        self._write(f"busy {start} {end} {rows}")

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")


class SleepRenderer(ShardRenderer):
    """ShardRenderer's interface with a fixed cost per row: it sleeps, holding the render lock
    as a GPU-bound worker holds its device, and answers ok with a made-up artifact."""

    def setup(self) -> dict:
        self._log = BusyLog(os.environ[BUSY_ENV], self.spec.artifact_name)
        self._log.born()
        return {"device": "sleep", "pid": os.getpid(), "load_s": 0.0}

    def placement(self) -> dict:
        return {"node_id": None, "gpu_ids": []}

    def render_shard(self, tasks: list[Task]) -> list[Result]:
        per_row = SLEEP_S[self.spec.artifact_name]
        with self._render_lock:
            start = time.time()
            time.sleep(per_row * len(tasks))
            self._log.busy(start, time.time(), len(tasks))
        ext = "mp4" if self.spec.final else "png"
        return [Result(id=t.id, ok=True, timings_s={"render_s": per_row},
                       artifacts=[stored_empty(self, self.spec.artifact_name, t.key, ext)])
                for t in tasks]


class TimedRenderer(ShardRenderer):
    """The real worker, timed: each shard's call, from start to results (two may overlap)."""

    def __init__(self, spec):
        super().__init__(spec)
        self._log = None

    def setup(self) -> dict:
        info = super().setup()  # also called by every shard: the model loads once
        if self._log is None:
            self._log = BusyLog(os.environ[BUSY_ENV], self.spec.artifact_name)
            self._log.born()
        return info

    def placement(self) -> dict:
        return {"node_id": None, "gpu_ids": []}

    def render_shard(self, tasks: list[Task]) -> list[Result]:
        start = time.time()
        results = super().render_shard(tasks)
        self._log.busy(start, time.time(), len(tasks))
        return results


class PeakRss:
    """This process's peak RSS, sampled every ``every_s`` on a thread."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1)


# --- the jobs ------------------------------------------------------------------------------

def job_config(workload: str, contender: str, prompts: str, out: str):
    """reelfarm's config of the workload; its stages are what the Ray Data actors run too."""
    from jobs.config import load_config

    if workload == "sleep":
        weights = WEIGHTS.get(contender, (1, 4))
        resources = [{"cpus": SLEEP_CPUS, "weight": w} for w in weights]
        shard, workers = SLEEP_SHARD, SLEEP_WORKERS
    else:
        resources = [{"cpus": 1, "weight": 1}, {"cpus": 1, "weight": 4}]
        shard, workers = TINY_SHARD, 2
    return load_config(None, base={
        "input": {"uri": prompts},
        "render": {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2,
                   "guidance_scale": 3.0, "seed": 7, "batch_size": 1},
        "stages": [{"name": "keyframe", "model": {"path": "tiny:sd"},
                    "render": {"guidance_scale": 5.0}, "resources": resources[0]},
                   {"name": "video", "model": {"path": "tiny:ltx-i2v"},
                    "resources": resources[1]}],
        "encode": {"fps": 8, "crf": 23, "preset": "ultrafast"},
        "output": {"uri": out, "shard_size": shard},
        "cluster": {"num_workers": workers, "balance": "auto", "shard_timeout_s": 300}})


def reelfarm(workload: str, contender: str, prompts: str, out: str, busy: str) -> dict:
    """``jobs.driver.render`` with the workload's worker class; what job.json says of the run,
    and when the balancer moved workers."""
    import cluster.pool
    from jobs.driver import render

    os.environ[BUSY_ENV] = busy  # Ray's local cluster and its workers inherit it
    moves: list[float] = []

    class Moves(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("rebalancing workers"):
                moves.append(record.created)

    logging.getLogger("jobs.run.balancer").addHandler(Moves())
    logging.getLogger("jobs.run.balancer").setLevel(logging.INFO)
    worker = SleepRenderer if workload == "sleep" else TimedRenderer
    real_pool = cluster.pool.WorkerPool
    cluster.pool.WorkerPool = functools.partial(real_pool, worker_class=worker)
    try:
        summary = render(job_config(workload, contender, prompts, out), progress=False)
    finally:
        cluster.pool.WorkerPool = real_pool
    with open(os.path.join(out, "job.json")) as f:
        last_run = json.load(f)["last_run"]
    return {"ok": summary.ok, "startup_s": round(summary.startup_s, 2),
            "stages": last_run.get("stages"), "workers_moved": last_run.get("workers_moved"),
            "rebalanced_at": moves}


class _SleepStage:
    """A Ray Data actor of the sleep workload: SleepRenderer's cost, batch by batch."""

    def __init__(self, stage: str, busy: str):
        self.stage = stage
        self.log = BusyLog(busy, stage)
        self.log.born()

    def __call__(self, batch: dict) -> dict:
        rows = len(batch["id"])
        start = time.time()
        time.sleep(SLEEP_S[self.stage] * rows)
        self.log.busy(start, time.time(), rows)
        ext = "png" if self.stage == "keyframe" else "mp4"
        return {**batch, self.stage: [f"{self.stage}/{i}.{ext}" for i in batch["id"]]}


class _TinyStage:
    """A Ray Data actor of one stage of the tiny job: the stage's pipeline, loaded once, renders
    each row as reelfarm's worker would and stores its PNG or MP4 under the output; the
    keyframe's pixels go on to the next stage in memory."""

    def __init__(self, cfg, index: int, out: str, busy: str):
        import torch

        from jobs.run.workers import worker_spec
        from jobs.stages import job_stages
        from rendering.pipelines import adapter_for
        from rendering.pipelines.load import load_pipeline

        torch.set_num_threads(1)
        self.cfg, self.out = cfg, out
        self.stage = job_stages(cfg)[index]
        self.spec = worker_spec(cfg, self.stage)
        self.pipe = load_pipeline(self.spec.model, "cpu", self.spec.optimize)
        self.adapter = adapter_for(self.pipe)
        self.folder = os.path.join(out, self.stage.folder)
        os.makedirs(self.folder, exist_ok=True)
        self.log = BusyLog(busy, self.stage.name)
        self.log.born()

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from jobs.input.rows import resolve
        from rendering.encode import encode_image, encode_video, to_uint8
        from rendering.pipelines.load import render_batch

        start = time.time()
        ids = [str(i) for i in batch["id"]]
        tasks = [self.stage.task_given(resolve({"id": i, "prompt": str(p)}, i, self.cfg), None)
                 for i, p in zip(ids, batch["prompt"])]
        media = [{"image": Image.fromarray(k)} for k in batch["keyframe"]] \
            if self.stage.index else [{} for _ in tasks]
        size = self.adapter.batch_limit(self.spec.batch_size)
        pixels = []
        for at in range(0, len(tasks), size):
            frames = render_batch(self.pipe, self.adapter, tasks[at:at + size], media[at:at + size])
            pixels += [to_uint8(f) for f in frames]
        out = {"id": ids}
        if self.stage.final:
            for task, video in zip(tasks, pixels):
                encode_video(video, os.path.join(self.folder, task.key + ".mp4"),
                             task.params["fps"], self.spec.encode)
        else:
            for task, image in zip(tasks, pixels):
                encode_image(image[0], os.path.join(self.folder, task.key + ".png"))
            out.update(prompt=[str(p) for p in batch["prompt"]],
                       keyframe=[image[0] for image in pixels])
        self.log.busy(start, time.time(), len(ids))
        return out


def ray_data(workload: str, contender: str, prompts: str, out: str, busy: str) -> dict:
    """read_parquet -> map_batches(keyframe actors) -> map_batches(video actors) ->
    write_parquet, with the resources reelfarm's workers hold."""
    import pyarrow.parquet as pq
    import ray

    rows = pq.read_metadata(prompts).num_rows
    slots = {}
    if workload == "sleep":
        shard = SLEEP_SHARD
        # Autoscaling may grow either stage to 4 actors; 5 worker slots (a GPU's stand-in)
        # keep the actors alive at once to reelfarm's 5 workers.
        slots = {"worker_slot": SLEEP_WORKERS}
        stages = [dict(fn=_SleepStage, fn_constructor_args=(name, busy), num_cpus=SLEEP_CPUS,
                       resources={"worker_slot": 1},
                       concurrency=(1, sum(SLEEP_SPLIT) - 1) if contender == "raydata-auto" else n)
                  for name, n in zip(STAGES, SLEEP_SPLIT)]
    else:
        shard = TINY_SHARD
        cfg = job_config(workload, contender, prompts, out)
        stages = [dict(fn=_TinyStage, fn_constructor_args=(cfg, i, out, busy), num_cpus=1,
                       concurrency=1) for i in range(len(STAGES))]
    # One logical CPU more than the machine, as in cpu_side_by_side: actors that claim every
    # CPU starve the read and write tasks and hang the pipeline (ray-project/ray#44687). Ray
    # itself is started as cluster.connect starts it, plus the worker slots.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING, num_cpus=os.cpu_count() + 1,
             resources=slots)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # One block per batch, so every actor gets batches from the start: Ray 2.60's Parquet
    # reader makes one block of one file whatever override_num_blocks says, and one block is
    # one task on one actor.
    ds = ray.data.read_parquet(prompts).repartition(max(1, rows // shard))
    for stage in stages:
        ds = ds.map_batches(**stage, batch_size=shard, batch_format="numpy")
    ds.write_parquet(os.path.join(out, "manifest"))
    return {"ok": pq.read_table(os.path.join(out, "manifest")).num_rows}


def _child(workload: str, contender: str, prompts: str, out: str, busy: str, result: str) -> None:
    peak = PeakRss()
    started = time.monotonic()
    run = reelfarm if contender.startswith("reelfarm") else ray_data
    figures = run(workload, contender, prompts, out, busy)
    figures.update(child_wall_s=round(time.monotonic() - started, 2), peak_rss_mib=peak.stop())
    with open(result, "w") as f:
        json.dump(figures, f)


# --- reading the busy logs ------------------------------------------------------------------

# --- the benchmark --------------------------------------------------------------------------

def run_once(workload: str, contender: str, prompts: str, root: str, rows: int) -> dict:
    folder = os.path.join(root, f"{workload}-{contender}")
    shutil.rmtree(folder, ignore_errors=True)
    out, busy, result = (os.path.join(folder, n) for n in ("out", "busy", "result.json"))
    os.makedirs(busy)
    proc = run_process([python(), "-m", "bench.stages", "--child", contender, "--workload",
                        workload, "--prompts", prompts, "--out", out, "--busy", busy,
                        "--result", result], timeout_s=600)
    figures = {}
    if proc.returncode == 0 and os.path.exists(result):
        with open(result) as f:
            figures = json.load(f)
    figures.update(measure(read_busy(busy)))
    if workload == "tiny":
        figures["outputs"] = outputs_digest(out)
    figures.update(workload=workload, contender=contender, rows=rows, wall_s=round(proc.wall_s, 2),
                   ok=proc.returncode == 0 and figures.get("ok") == rows)
    if not figures["ok"]:
        figures["output_tail"] = proc.output[-1500:]
    if figures.get("rebalanced_at"):  # seconds from the first shard to each move
        figures["rebalanced_after_s"] = [round(t - figures["first_busy"], 2)
                                         for t in figures["rebalanced_at"]]
        moved_at = figures["rebalanced_at"][0]
        late = [b for b in figures["video_ready"] if b > moved_at]
        if late:  # the moved workers ready to take shards
            figures["moved_workers_ready_after_s"] = round(max(late) - moved_at, 2)
    return figures


def run(workloads: dict, sizes: dict, rounds: int, root: str) -> dict:
    os.makedirs(root, exist_ok=True)
    prompts = {w: write_prompts(os.path.join(root, f"prompts-{n}.parquet"), n)
               for w, n in sizes.items()}
    runs = []
    for r in range(rounds):
        for workload, contenders in workloads.items():
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for contender in order:
                figures = run_once(workload, contender, prompts[workload], root, sizes[workload])
                figures["round"] = r
                runs.append(figures)
                busy = figures["busy"].get(figures["slowest"])
                print(f"round {r} {workload:5s} {contender:20s}: "
                      f"{figures['rows_per_s'] or float('nan'):6.2f} rows/s, slowest stage "
                      f"{figures['slowest']} {100 * (busy or 0):5.1f}% busy, driver "
                      f"{figures.get('peak_rss_mib', float('nan'))} MiB, wall {figures['wall_s']} s"
                      + ("" if figures["ok"] else " FAILED: " + figures["output_tail"]), flush=True)
    return {"machine": machine(), "sizes": sizes, "rounds": rounds, "sleep_s": SLEEP_S,
            "runs": runs, "summary": summarize(runs, workloads)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rows, one round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workloads", nargs="+", choices=list(CONTENDERS),
                        default=list(CONTENDERS))
    parser.add_argument("--contenders", nargs="+", default=None,
                        choices=sorted({c for cs in CONTENDERS.values() for c in cs}))
    parser.add_argument("--sleep-rows", type=int, default=None)
    parser.add_argument("--tiny-rows", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    for hidden in ("--prompts", "--out", "--busy", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.workload, args.child, args.prompts, args.out, args.busy, args.result)
        return 0
    sizes = {"sleep": args.sleep_rows or (24 if args.quick else 400),
             "tiny": args.tiny_rows or (4 if args.quick else 400)}
    rounds = args.rounds or (1 if args.quick else 3)
    workloads = {w: [c for c in CONTENDERS[w] if not args.contenders or c in args.contenders]
                 for w in args.workloads}
    if args.quick:  # each worker class once, in three runs
        workloads = {w: [c for c in cs if c in QUICK[w]] for w, cs in workloads.items()}
    if not has_pandas():
        print("raydata: skipped, Ray Data needs pandas: pip install -e '.[bench]' (make bench does)")
        workloads = {w: [c for c in cs if not c.startswith("raydata")]
                     for w, cs in workloads.items()}
    name = "stages" + ("_quick" if args.quick else "")
    result = run(workloads, {w: sizes[w] for w in workloads}, rounds, os.path.join(OUT, name))
    print(json.dumps(result["summary"], indent=2))
    print("saved", save(name, result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
