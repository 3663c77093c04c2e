"""The text stage measured: batched generation against one prompt at a time, the cache on a
dataset whose prompts repeat, and the stage's share of a three-stage job.

1. ``batching``: the tiny LM (``tiny:lm``) on the CPU, one torch thread, rewriting distinct
   prompts (greedy, ``max_new_tokens`` 64, the same tokens in every contender):
   - ``vendor-loop``: one ``generate`` call per prompt, as the video models' own rewriters do
     (CogVideoX's ``convert_demo.py``, Wan's ``prompt_extend``), storing nothing;
   - ``stage-1``: the text stage's worker (``TextRewriter.render_shard``: chats, judging,
     artifacts and receipts stored on local disk) with ``batch_size`` 1;
   - ``stage-16``: the same with ``batch_size`` 16 (the default).
   Rounds interleave them; rows/s are medians. The texts are checked equal across contenders.
2. ``cache``: one worker over a dataset of ``rows`` rows drawn from ``distinct`` prompts (each
   prompt repeated, the repeats spread over the shards), cache under the output: the hit rate,
   the generations made, rows/s; then a rerun (a new worker, the same cache).
3. ``share``: a tiny three-stage job (rewrite -> keyframe -> video: tiny:lm, tiny:sd,
   tiny:ltx-i2v at 32x32, 9 frames, 2 steps) on a local Ray cluster, its own process, against
   the same job without the text stage; from each ``job.json``: the rendering time (start-up
   left out) and each stage's worker seconds.

    python -m bench.text_stage            # 64 prompts x 3 rounds; 256 rows of 32; 48-row jobs
    python -m bench.text_stage --quick    # a smoke run (the three-stage job alone, 4 rows)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import yaml

from bench.common import machine, median, python, run_process, save

SUBJECTS = ["a red fox", "an old man", "a small boat", "a neon city street", "a white owl",
            "two children", "a black horse", "a glass tower", "a quiet lake", "a paper lantern",
            "a desert road", "a forest cabin", "a golden retriever", "a steam train",
            "a violin player", "a snowy mountain"]
PLACES = ["in the snow", "at sunset", "in the rain", "under the stars", "at dawn",
          "in the fog", "by the sea", "in a market", "on a bridge", "in autumn"]


def distinct_prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {PLACES[i // len(SUBJECTS) % len(PLACES)]}, "
            f"take {i // (len(SUBJECTS) * len(PLACES))}" for i in range(n)]


def _tasks(prompts: list[str], prefix: str):
    from rendering.contract import Task

    return [Task(f"{prefix}-{i:05d}", f"{prefix}-{i:05d}", i, p, {}) for i, p in enumerate(prompts)]


def _rewriter(output: str, batch_size: int, max_new_tokens: int, cache: bool):
    from rendering.contract import ModelSpec, TextSpec, WorkerSpec
    from rendering.text.prompts import sha256, system_prompt
    from rendering.text.worker import TextRewriter

    system = system_prompt("t2v", 80)
    text = TextSpec(system, sha256(system), max_new_tokens=max_new_tokens,
                    cache_uri=os.path.join(output, "cache") if cache else None,
                    limit_model=ModelSpec("tiny:ltx-i2v"), max_prompt_tokens=100000)
    spec = WorkerSpec(ModelSpec("tiny:lm"), None, output, "stages/rewrite", "receipts/rewrite",
                      "previews", batch_size=batch_size, artifact_name="rewrite", final=False,
                      text=text)
    return TextRewriter(spec, "cpu")


def batching(rows: int, rounds: int, max_new_tokens: int) -> dict:
    """Part 1: rows/s of the vendors' loop and of the stage at batch sizes 1 and 16."""
    import torch

    from rendering.text.generate import Sampling

    torch.set_num_threads(1)
    prompts = distinct_prompts(rows)
    work = tempfile.mkdtemp(prefix="reelfarm-bench-text-")
    stages = {size: _rewriter(os.path.join(work, f"b{size}"), size, max_new_tokens, False)
              for size in (1, 16)}
    lm = stages[1].lm
    system = stages[1].text.system_prompt
    sampling = Sampling(max_new_tokens)
    lm.generate(system, prompts[:2], [0, 1], sampling)  # the first call's one-time cost
    timings = {"vendor-loop": [], "stage-1": [], "stage-16": []}
    texts = {}
    for r in range(rounds):
        order = list(timings)[r % 3:] + list(timings)[:r % 3]
        for name in order:
            started = time.perf_counter()
            if name == "vendor-loop":
                made = [lm.generate(system, [p], [i], sampling)[0].text
                        for i, p in enumerate(prompts)]
            else:
                stage = stages[int(name.split("-")[1])]
                stage._memory.clear()  # each round generates every prompt again
                results = stage.render_shard(_tasks(prompts, f"r{r}"))
                made = [json.loads(open(os.path.join(work, f"b{name.split('-')[1]}",
                                                     res.artifacts[0].path)).read())["generated"]
                        for res in results]
            timings[name].append(time.perf_counter() - started)
            texts[name] = made
    shutil.rmtree(work, ignore_errors=True)
    same = texts["vendor-loop"] == texts["stage-1"] == texts["stage-16"]
    tokens = sum(len(lm.chats.tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in texts["stage-16"])
    out = {name: {"seconds": [round(t, 3) for t in ts], "rows_per_s": round(rows / median(ts), 2)}
           for name, ts in timings.items()}
    base = out["vendor-loop"]["rows_per_s"]
    for name in out:
        out[name]["x_vendor_loop"] = round(out[name]["rows_per_s"] / base, 2)
    return {"rows": rows, "rounds": rounds, "max_new_tokens": max_new_tokens,
            "mean_new_tokens": round(tokens / rows, 1), "texts_equal": same, "contenders": out}


def cache(rows: int, distinct: int, shard: int, max_new_tokens: int) -> dict:
    """Part 2: one worker over ``rows`` rows of ``distinct`` prompts, then a rerun."""
    import torch

    torch.set_num_threads(1)
    prompts = distinct_prompts(distinct)
    dataset = [prompts[(i * 7) % distinct] for i in range(rows)]  # repeats spread out
    work = tempfile.mkdtemp(prefix="reelfarm-bench-cache-")
    passes = []
    for attempt in ("first", "rerun"):
        worker = _rewriter(work, 16, max_new_tokens, True)
        tasks = _tasks(dataset, "c")
        started = time.perf_counter()
        results = []
        for i in range(0, rows, shard):
            results += worker.render_shard(tasks[i:i + shard])
        seconds = time.perf_counter() - started
        hits = sum(bool(r.metrics["rewrite_cache_hit"]) for r in results)
        passes.append({"pass": attempt, "hits": hits, "hit_rate": round(hits / rows, 3),
                       "generated": worker.generated, "seconds": round(seconds, 3),
                       "rows_per_s": round(rows / seconds, 2)})
    entries = len(os.listdir(os.path.join(work, "cache")))
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "distinct": distinct, "shard_size": shard,
            "best_hit_rate": round(1 - distinct / rows, 3), "cache_entries": entries,
            "passes": passes}


def _job(folder: str, rows: int, text: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = os.path.join(folder, "prompts.parquet")
    prompts = distinct_prompts(rows)
    pq.write_table(pa.table({"id": [f"row-{i:04d}" for i in range(rows)], "prompt": prompts}), src)
    stages = [{"name": "keyframe", "model": {"path": "tiny:sd"}, "resources": {"cpus": 0.5}},
              {"name": "video", "model": {"path": "tiny:ltx-i2v"}, "resources": {"cpus": 1}}]
    if text:
        stages.insert(0, {"name": "rewrite", "model": {"path": "tiny:lm"},
                          "text": {"max_new_tokens": 16, "target_words": 15},
                          "resources": {"cpus": 0.5}})
    cfg = {"input": {"uri": src}, "output": {"uri": os.path.join(folder, "out"), "shard_size": 4},
           "render": {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2,
                      "seed": 1},
           "encode": {"fps": 8, "crf": 23, "preset": "ultrafast"}, "stages": stages,
           "cluster": {"num_workers": len(stages), "balance": "fixed"}}
    config = os.path.join(folder, "job.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    run = run_process([python(), "-m", "jobs.cli", "render", config, "--quiet"], timeout_s=900)
    if run.returncode != 0:
        raise RuntimeError(f"the {'three' if text else 'two'}-stage job failed:\n"
                           f"{run.output[-2000:]}")
    with open(os.path.join(folder, "out", "job.json")) as f:
        last = json.load(f)["last_run"]
    figures = last["stages"]
    worker_s = {name: round(s["seconds_per_row"] * s["made"], 3) for name, s in figures.items()}
    total = sum(worker_s.values())
    return {"wall_s": round(run.wall_s, 2), "startup_s": last["startup_s"],
            "rendering_s": last["rendering_s"], "worker_s": worker_s,
            "worker_share": {n: round(s / total, 3) for n, s in worker_s.items()}}


def share(rows: int, baseline: bool = True) -> dict:
    """Part 3: a three-stage tiny job against the same two stages without the text stage
    (``baseline``; the quick mode runs the three stages alone)."""
    work = tempfile.mkdtemp(prefix="reelfarm-bench-share-")
    out = {"rows": rows}
    for text in (True, False) if baseline else (True,):
        folder = os.path.join(work, "three" if text else "two")
        os.makedirs(folder)
        out["three_stages" if text else "two_stages"] = _job(folder, rows, text)
    shutil.rmtree(work, ignore_errors=True)
    if not baseline:
        return out
    three, two = out["three_stages"], out["two_stages"]
    out["rendering_s_added"] = round(three["rendering_s"] - two["rendering_s"], 2)
    out["rendering_share_added"] = round(out["rendering_s_added"] / three["rendering_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    result = {"machine": machine()}
    result["batching"] = batching(16 if quick else 64, 1 if quick else 3, 16 if quick else 64)
    for name, figures in result["batching"]["contenders"].items():
        print(f"batching: {name}: {figures['rows_per_s']} rows/s "
              f"({figures['x_vendor_loop']}x the vendors' loop)", flush=True)
    result["cache"] = cache(32 if quick else 256, 8 if quick else 32, 8 if quick else 32,
                            16 if quick else 64)
    for p in result["cache"]["passes"]:
        print(f"cache: {p['pass']}: hit rate {p['hit_rate']} ({p['generated']} generated), "
              f"{p['rows_per_s']} rows/s", flush=True)
    result["share"] = share(4 if quick else 48, baseline=not quick)
    s = result["share"]
    print(f"share: three stages {s['three_stages']['rendering_s']} s rendering "
          f"(rewrite's worker share {s['three_stages']['worker_share']['rewrite']})" +
          (f", two stages {s['two_stages']['rendering_s']} s" if "two_stages" in s else ""),
          flush=True)
    path = save("text_stage_quick" if quick else "text_stage", result)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
