"""Side by side on this CPU machine: reelfarm vs a hand-written diffusers loop vs Ray Data.

All three render the same prompts with the same tiny random-weight model (tiny:modelscope),
the same render settings (configs/demo.yaml's) and the same encode settings, and write one MP4
per prompt. Each contender runs as a whole process, timed from launch to exit, at two sizes, so
start-up and steady rate separate:

    rate      = (n_large - n_small) / (t_large - t_small)      videos/s
    start-up  = t_small - n_small / rate                       s

Rounds interleave the contenders (and rotate their order) so that load from other users of a
shared machine falls on all of them alike; the report gives medians over rounds.

    python -m bench.cpu_side_by_side            # sizes 8 and 40, 3 rounds
    python -m bench.cpu_side_by_side --quick    # a smoke run in under a minute
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from bench.common import (OUT, has_pandas, machine, median, python, run_process, save,
                          steady_rate)

SYSTEMS = ("handloop", "reelfarm", "raydata", "reelfarm-wds", "reelfarm-nometrics")
# reelfarm-wds: reelfarm packing WebDataset shards of 8 rows as it runs (it must not slow rendering);
# reelfarm-nometrics: reelfarm exporting no metrics (what exporting them costs)
_EXTRA = {"reelfarm-wds": ["output.webdataset={rows_per_shard: 8}"],
          "reelfarm-nometrics": ["metrics.enabled=false"]}
DEMO_CONFIG = "configs/demo.yaml"
QUICK_OVERRIDES = ["render.num_frames=8", "render.height=32", "render.width=32",
                   "render.num_inference_steps=2", "encode.preset=ultrafast"]
_SUBJECTS = ["a red fox", "an old lighthouse", "a paper boat", "a city tram", "a snow owl",
             "a desert road", "a jazz trio", "a koi pond", "a wind turbine", "a night market"]
_ACTIONS = ["at dawn", "in the rain", "seen from above", "in slow motion", "under neon light"]


def workload(overrides: list[str]):
    """The render and encode settings every contender uses: demo.yaml's, plus overrides."""
    from jobs.config import load_config

    return load_config(DEMO_CONFIG, ["input.uri=unused", "output.uri=unused", *overrides])


def write_prompts(path: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"bench-{i:05d}",
             "prompt": f"{_SUBJECTS[i % len(_SUBJECTS)]} {_ACTIONS[i // len(_SUBJECTS) % len(_ACTIONS)]}, take {i}"}
            for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- the contenders, each run as its own process --------------------------------------------

def _argv(system: str, prompts: str, out: str, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    if system.startswith("reelfarm"):
        extra = [a for o in _EXTRA.get(system, []) for a in ("--set", o)]
        return [python(), "-m", "jobs.cli", "render", DEMO_CONFIG, "--input", prompts,
                "--output", out, "--quiet", *sets, *extra]
    return [python(), "-m", "bench.cpu_side_by_side", "--child", system, "--prompts", prompts,
            "--out", out, *sets]


def _child(system: str, prompts: str, out: str, overrides: list[str]) -> None:
    cfg = workload(overrides)
    os.makedirs(out, exist_ok=True)
    if system == "handloop":
        hand_loop(cfg, prompts, out)
    elif system == "raydata":
        ray_data(cfg, prompts, out)
    else:
        raise SystemExit(f"unknown contender {system}")


def _render(pipe, cfg, prompts: list[str], seeds: list[int]):
    import torch

    with torch.inference_mode():
        return pipe(prompt=prompts, num_frames=cfg.render.num_frames, height=cfg.render.height,
                    width=cfg.render.width, num_inference_steps=cfg.render.num_inference_steps,
                    guidance_scale=cfg.render.guidance_scale, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).frames


def _encode(cfg, frames, path: str) -> int:
    """Plain ffmpeg, same argv and settings as reelfarm's encoder, no decode-back check."""
    import subprocess

    from rendering.contract import EncodeSpec
    from rendering.encode import encode_argv, to_uint8
    from rendering.ffmpeg_runner import ffmpeg_exe

    frames = to_uint8(frames)
    argv = encode_argv(ffmpeg_exe(), path, frames.shape[2], frames.shape[1], cfg.encode.fps,
                       EncodeSpec(crf=cfg.encode.crf, preset=cfg.encode.preset))
    subprocess.run(argv, input=frames.tobytes(), capture_output=True, check=True)
    return os.path.getsize(path)


def hand_loop(cfg, prompts_path: str, out: str) -> None:
    """Load once, render batch by batch, encode each video with ffmpeg, write it."""
    import pyarrow.parquet as pq
    import torch

    from jobs.input.rows import row_seed
    from rendering.pipelines.tiny import build_tiny_pipeline, tiny_kind

    torch.set_num_threads(os.cpu_count())
    pipe = build_tiny_pipeline(tiny_kind(cfg.model.path))
    pipe.set_progress_bar_config(disable=True)
    table = pq.read_table(prompts_path).to_pylist()
    size = cfg.render.batch_size
    for i in range(0, len(table), size):
        rows = table[i:i + size]
        frames = _render(pipe, cfg, [r["prompt"] for r in rows],
                         [row_seed(cfg.render.seed, r["id"]) for r in rows])
        for row, video in zip(rows, frames):
            _encode(cfg, video, os.path.join(out, row["id"] + ".mp4"))


class _RayDataRenderer:
    """Ray Data's actor-class UDF: loads the pipeline once per actor, renders and encodes."""

    def __init__(self, cfg, out: str):
        import torch

        from rendering.pipelines.tiny import build_tiny_pipeline, tiny_kind

        torch.set_num_threads(cfg.cluster.cpus_per_worker)
        self.cfg, self.out = cfg, out
        self.pipe = build_tiny_pipeline(tiny_kind(cfg.model.path))
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict) -> dict:
        from jobs.input.rows import row_seed

        ids = [str(i) for i in batch["id"]]
        frames = _render(self.pipe, self.cfg, [str(p) for p in batch["prompt"]],
                         [row_seed(self.cfg.render.seed, i) for i in ids])
        sizes = [_encode(self.cfg, video, os.path.join(self.out, i + ".mp4"))
                 for i, video in zip(ids, frames)]
        return {"id": ids, "bytes": sizes}


def ray_data(cfg, prompts_path: str, out: str) -> None:
    """read_parquet -> map_batches(actor class) -> write_parquet, on a local Ray cluster."""
    import ray

    from cluster.connect import connect

    # Actors that claim every CPU starve the read and write tasks and hang the pipeline
    # (ray-project/ray#44687): one extra logical CPU leaves them a slot. The actors hold
    # cpus_per_worker CPUs and torch threads each, like reelfarm's workers.
    connect(None, num_cpus=os.cpu_count() + 1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    workers = cfg.cluster.num_workers or max(1, os.cpu_count() // cfg.cluster.cpus_per_worker)
    # One small file is one block, which only one actor would ever see: split it so every
    # actor gets batches (what a user tuning Ray Data would do).
    ds = ray.data.read_parquet(prompts_path, override_num_blocks=4 * workers)
    ds = ds.map_batches(_RayDataRenderer, fn_constructor_args=(cfg, out),
                        batch_size=cfg.render.batch_size, concurrency=workers,
                        num_cpus=cfg.cluster.cpus_per_worker, batch_format="numpy")
    ds.write_parquet(os.path.join(out, "manifest"))


# --- the benchmark --------------------------------------------------------------------------

def run(sizes: list[int], rounds: int, systems: list[str], overrides: list[str],
        root: str) -> dict:
    os.makedirs(root, exist_ok=True)
    prompts = {n: write_prompts(os.path.join(root, f"prompts-{n}.parquet"), n) for n in sizes}
    runs = []
    for r in range(rounds):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for n in sizes:
            for system in order:
                out = os.path.join(root, f"{system}-{n}")
                shutil.rmtree(out, ignore_errors=True)
                proc = run_process(_argv(system, prompts[n], out, overrides))
                videos = len(glob.glob(os.path.join(out, "**", "*.mp4"), recursive=True))
                ok = proc.returncode == 0 and videos == n
                runs.append({"round": r, "system": system, "n": n, "wall_s": round(proc.wall_s, 2),
                             "peak_rss_mb": round(proc.peak_rss_mb), "videos": videos, "ok": ok})
                print(f"round {r} {system:9s} n={n:3d}: {proc.wall_s:6.1f} s, "
                      f"{videos} videos{'' if ok else ' FAILED: ' + proc.output[-800:]}",
                      flush=True)
    return {"machine": machine(), "sizes": sizes, "rounds": rounds, "overrides": overrides,
            "runs": runs, "summary": summarize(runs, sizes, systems)}


def summarize(runs: list[dict], sizes: list[int], systems: list[str]) -> dict:
    """Per contender: median wall time per size, and steady rate and start-up per round."""
    small, large = min(sizes), max(sizes)
    summary = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system and r["ok"]]
        walls = {n: [r["wall_s"] for r in mine if r["n"] == n] for n in sizes}
        rates, startups = [], []
        for rnd in sorted({r["round"] for r in mine}):
            t = {r["n"]: r["wall_s"] for r in mine if r["round"] == rnd}
            steady = steady_rate(small, large, t[small], t[large]) \
                if small in t and large in t else None
            if steady:
                rates.append(steady[0])
                startups.append(steady[1])
        # Also from the medians, which is steadier when one round was disturbed.
        from_medians = steady_rate(small, large, median(walls[small]), median(walls[large]))
        summary[system] = {
            "median_wall_s": {n: round(median(walls[n]), 2) for n in sizes},
            "rate_per_round": [round(x, 3) for x in rates],
            "startup_per_round_s": [round(x, 1) for x in startups],
            "median_rate_videos_per_s": round(median(rates), 3),
            "median_startup_s": round(median(startups), 1),
            "rate_from_median_walls": round(from_medians[0], 3) if from_medians else None,
            "startup_from_median_walls_s": round(from_medians[1], 1) if from_medians else None,
            "peak_rss_mb_driver": max((r["peak_rss_mb"] for r in mine), default=None),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, handloop and reelfarm, 1 round")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="small and large video counts")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="workload override for every contender, e.g. encode.preset=ultrafast")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.prompts, args.out, args.set)
        return 0
    if args.quick:
        sizes, rounds, systems = args.sizes or [2, 4], args.rounds or 1, args.systems or ["handloop", "reelfarm"]
        overrides = QUICK_OVERRIDES + args.set
    else:
        sizes, rounds, systems = args.sizes or [8, 40], args.rounds or 3, args.systems or list(SYSTEMS)
        overrides = args.set
    if "raydata" in systems and not has_pandas():
        print("raydata: skipped, Ray Data needs pandas: pip install -e '.[bench]' (make bench does)")
        systems = [s for s in systems if s != "raydata"]
    name = "cpu_side_by_side" + ("_quick" if args.quick else "")
    result = run(sizes, rounds, systems, overrides, os.path.join(OUT, name))
    print(json.dumps(result["summary"], indent=2))
    print("saved", save(name, result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
