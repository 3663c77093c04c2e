"""What the per-row products cost: CLIP scoring and previews per video, WebDataset packing.

Everything runs in this process on real code paths: rendering.scoring.ClipScorer on tiny:clip,
rendering.previews.write_previews, and the WebDataset Packer over an output rendered by a
real tiny job. Each figure is the median of ``--rounds`` timings; torch uses one thread, as a
1-CPU worker does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from bench.common import OUT, machine, median, save


def _frames(num_frames: int, side: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 255, (num_frames, side, side, 3), dtype=np.uint8)


def scoring(rounds: int, num_frames: int, side: int) -> dict:
    """Seconds per video to score every frame against its prompt."""
    import torch

    from rendering.contract import ScoringSpec
    from rendering.scoring import TINY_CLIP, ClipScorer

    torch.set_num_threads(1)
    scorer = ClipScorer(ScoringSpec(TINY_CLIP), "cpu")
    video = _frames(num_frames, side, 0)
    scorer.score(["a cat"], [video])  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        scorer.score(["a cat"], [video])
        times.append(time.perf_counter() - started)
    return {"s_per_video": round(median(times), 4), "frames": num_frames, "side": side}


def previews(rounds: int, num_frames: int, side: int) -> dict:
    """Seconds and bytes per video for each preview kind."""
    from rendering.previews import PREVIEW_KINDS, PreviewSpec, write_previews

    video = _frames(num_frames, side, 1)
    found = {}
    for kind in PREVIEW_KINDS:
        times, size = [], 0
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                path = write_previews(video, 8, PreviewSpec(kinds=(kind,)), folder)[kind]
                times.append(time.perf_counter() - started)
                size = os.path.getsize(path)
        found[kind] = {"s_per_video": round(median(times), 4), "bytes": size}
    return found


def packing(rounds: int, rows: int, rows_per_shard: int) -> dict:
    """MB/s and shards/s of packing an output rendered by a real tiny job, from scratch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.config import validate
    from jobs.driver import render
    from jobs.products.webdataset.packer import Packer
    from jobs.products.webdataset.tars import PackSpec

    root = os.path.join(OUT, "products")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    src = os.path.join(root, "prompts.parquet")
    pq.write_table(pa.table({"id": [f"row-{i:05d}" for i in range(rows)],
                             "prompt": [f"a scene, take {i}" for i in range(rows)]}), src)
    out = os.path.join(root, "out")
    render(validate({"input": {"uri": src}, "model": {"path": "tiny:modelscope"},
                     "render": {"num_frames": 8, "height": 32, "width": 32,
                                "num_inference_steps": 2, "batch_size": 4},
                     "encode": {"preset": "ultrafast"}, "output": {"uri": out},
                     "cluster": {"backend": "inline"}}), progress=False)
    times, size = [], 0
    for _ in range(rounds):
        shutil.rmtree(os.path.join(out, "shards"), ignore_errors=True)
        started = time.perf_counter()
        packer = Packer(out, PackSpec(rows_per_shard), rows)
        packer.seed_from_output()
        packer.close()
        times.append(time.perf_counter() - started)
        size = sum(os.path.getsize(os.path.join(out, "shards", n))
                   for n in os.listdir(os.path.join(out, "shards")) if n.endswith(".tar"))
    seconds = median(times)
    shards = -(-rows // rows_per_shard)
    return {"rows": rows, "rows_per_shard": rows_per_shard, "tar_mb": round(size / 1e6, 2),
            "s": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 1),
            "shards_per_s": round(shards / seconds, 2), "rows_per_s": round(rows / seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds of small work")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    result = {"machine": machine(), "rounds": rounds,
              "scoring": scoring(rounds, 16, 128),
              "previews": previews(rounds, 16, 128),
              "packing": packing(rounds, 20 if args.quick else 200, 5 if args.quick else 50)}
    for name in ("scoring", "previews", "packing"):
        print(name, result[name])
    print("saved", save("products" + ("_quick" if args.quick else ""), result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
