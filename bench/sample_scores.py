"""What per-sample scores cost, and ``reelfarm dedup`` at a million rows.

- ``scores``: seconds per video of each score on real code paths, side by side in interleaved
  rounds (medians): CLIP alone (frames' embeddings, the score and the kept embedding), CLIP with
  the aesthetic head (``tiny:clip`` + ``tiny:aesthetic``), and motion (OpenCV Farneback);
  torch uses one thread, as a 1-CPU worker does.
- ``dedup``: a synthetic output of ``--rows`` ok rows with random unit embeddings of ``--dim``
  floats (1% of them planted near-copies of earlier rows), committed as shard manifests; then
  ``jobs.products.dedup.dedup`` with each ``--searches`` side by side, each in its own child
  process, in interleaved rounds: wall time of the command and of its search (medians), peak
  RSS (``VmHWM``, the memmap'd embeddings' pages included), and which of the planted copies it
  found (random embeddings have no clusters: the buckets' worst case).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import machine, median, save

SHARD_ROWS = 4096  # rows a manifest: a folded output's segment (64 shards of 64 rows)


def scores(rounds: int, num_frames: int, side: int) -> dict:
    import torch

    from rendering.aesthetic import TINY_AESTHETIC
    from rendering.contract import ScoringSpec
    from rendering.motion import motion_columns
    from rendering.scoring import TINY_CLIP, ClipScorer

    torch.set_num_threads(1)
    video = np.random.default_rng(0).integers(0, 255, (num_frames, side, side, 3), dtype=np.uint8)
    clip = ClipScorer(ScoringSpec(TINY_CLIP), "cpu")
    both = ClipScorer(ScoringSpec(TINY_CLIP, aesthetic_model=TINY_AESTHETIC), "cpu")
    contenders = {"clip_and_embedding": lambda: clip.score(["a cat"], [video]),
                  "clip_embedding_aesthetic": lambda: both.score(["a cat"], [video]),
                  "motion": lambda: motion_columns(video, 0.2)}
    times = {name: [] for name in contenders}
    for name, fn in contenders.items():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    found = {name: round(median(t), 5) for name, t in times.items()}
    found["aesthetic_alone"] = round(found["clip_embedding_aesthetic"] - found["clip_and_embedding"], 5)
    return {"s_per_video": found, "frames": num_frames, "side": side, "rounds": rounds}


def synthetic_output(folder: str, rows: int, dim: int, copies: int, seed: int = 0) -> list[int]:
    """Shard manifests of ``rows`` ok rows; returns the row indexes planted as near-copies."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.store import layout, manifest

    rng = np.random.default_rng(seed)
    planted = np.sort(rng.choice(np.arange(1, rows), copies, replace=False))
    os.makedirs(os.path.join(folder, layout.MANIFESTS_DIR))
    embeddings = np.empty((rows, dim), np.float16)
    for start in range(0, rows, SHARD_ROWS):
        block = rng.standard_normal((min(SHARD_ROWS, rows - start), dim)).astype(np.float32)
        embeddings[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    for row in planted:  # a near-copy of a random earlier row
        near = embeddings[rng.integers(0, row)].astype(np.float32) + \
            rng.normal(0, 0.01, dim).astype(np.float32)
        embeddings[row] = near / np.linalg.norm(near)
    for n, start in enumerate(range(0, rows, SHARD_ROWS)):
        end = min(start + SHARD_ROWS, rows)
        count = end - start
        columns = {f.name: pa.nulls(count, f.type) for f in manifest.SCHEMA}
        columns.update(
            id=pa.array([f"r{i}" for i in range(start, end)]),
            row_index=pa.array(np.arange(start, end), pa.int64()),
            occurrence=pa.array(np.zeros(count, np.int32)), status=pa.array(["ok"] * count),
            committed_at=pa.array(np.full(count, 1.0)),
            clip_embedding=pa.ListArray.from_arrays(
                pa.array(np.arange(0, count + 1, dtype=np.int32) * dim),
                pa.array(embeddings[start:end].reshape(-1), pa.float16())))
        table = pa.table([columns[f.name] for f in manifest.SCHEMA], schema=manifest.SCHEMA)
        pq.write_table(table, os.path.join(folder, layout.MANIFESTS_DIR,
                                           f"{layout.SHARD_PREFIX}{n:06d}.parquet"))
    return planted.tolist()


def dedup_child(output: str, block_rows: int, search: str, probes: int | None) -> None:
    """Run dedup here and print what it found with this process's peak memory; ``probes``:
    the buckets a row is compared in, in place of ``nearest.PROBES``."""
    import pyarrow.parquet as pq

    from jobs.products import nearest
    from jobs.products.dedup import dedup
    from jobs.store.layout import DUPLICATES_FILE

    nearest.PROBES = probes or nearest.PROBES

    imported_mb = _peak_rss_mb()
    anon = _AnonPeak()
    started = time.perf_counter()
    found = dedup(output, block_rows=block_rows, search=search)
    seconds = time.perf_counter() - started  # the command: the search, then consolidation
    anon.stop()
    rows = sorted(pq.read_table(os.path.join(output, DUPLICATES_FILE))["row_index"].to_pylist())
    print(json.dumps({"seconds": round(seconds, 1), "search_s": round(found.seconds, 1),
                      "rows": found.rows,
                      "duplicates": found.duplicates, "duplicate_rows": rows,
                      "rss_after_imports_mb": imported_mb, "peak_rss_mb": _peak_rss_mb(),
                      "peak_anon_rss_mb": anon.peak_mb}))


def _status_mb(field: str) -> int:
    with open("/proc/self/status") as f:
        return round(int(f.read().split(f"{field}:")[1].split()[0]) / 1024)


def _peak_rss_mb() -> int:
    return _status_mb("VmHWM")


class _AnonPeak:
    """The peak of ``RssAnon`` (VmHWM counts the memmap'd spill file's pages too, which the
    kernel may drop at will), sampled on a thread every 50 ms."""

    def __init__(self):
        import threading

        self.peak_mb = _status_mb("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def dedup_run(rows: int, dim: int, block_rows: int, searches: list[str], rounds: int,
              probes: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-dedup-") as folder:
        started = time.perf_counter()
        planted = synthetic_output(folder, rows, dim, max(1, rows // 100))
        made_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {search: [] for search in searches}
        for _ in range(rounds):
            for search in searches:
                code = (f"from bench.sample_scores import dedup_child; "
                        f"dedup_child({folder!r}, {block_rows}, {search!r}, {probes!r})")
                out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, check=True).stdout
                runs[search].append(json.loads(out.strip().splitlines()[-1]))
    found = {}
    for search, results in runs.items():
        marked = set(results[-1].pop("duplicate_rows"))
        found[search] = {
            "seconds": [r["seconds"] for r in results],
            "median_s": median([r["seconds"] for r in results]),
            "search_median_s": median([r["search_s"] for r in results]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_anon_rss_mb": max(r["peak_anon_rss_mb"] for r in results),
            "rss_after_imports_mb": results[-1]["rss_after_imports_mb"],
            "duplicates": results[-1]["duplicates"],
            "planted_found": len(marked & set(planted)),
            "found_not_planted": len(marked - set(planted))}
    return {"rows": rows, "dim": dim, "block_rows": block_rows, "rounds": rounds, "probes": probes,
            "output_made_s": round(made_s, 1), "planted": len(planted), "searches": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["scores", "dedup"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--searches", nargs="+", default=["buckets"],
                        help="exact is quadratic: about 3 hours at 1M rows of 768-d (RESULTS 13)")
    parser.add_argument("--dedup-rounds", type=int, default=1)
    parser.add_argument("--probes", type=int, help="buckets: buckets compared per row (default: "
                                                   "jobs.products.nearest.PROBES)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, 20k rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.rows, args.searches = 3, 20_000, ["exact", "buckets"]
    result = {"machine": machine()}
    if "scores" in args.parts:
        result["scores"] = scores(args.rounds, args.frames, args.side)
    if "dedup" in args.parts:
        result["dedup"] = dedup_run(args.rows, args.dim, args.block_rows, args.searches,
                                    args.dedup_rounds, args.probes)
    print(json.dumps(result, indent=2))
    name = f"_{args.rows}_{args.dim}_{'_'.join(args.searches)}" if "dedup" in args.parts else ""
    save(f"sample_scores{name}" + (f"_probes{args.probes}" if args.probes else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
