"""What bench/stages.py's runs measured, from the busy intervals each worker logged: the video
stage's steady rate, the slowest stage's busy share, and the medians over rounds."""

from __future__ import annotations

import os

from bench.common import median

STAGES = ("keyframe", "video")


def read_busy(folder: str) -> list[dict]:
    """Every worker's stage, readiness and busy intervals (start, end, rows)."""
    workers = []
    for name in sorted(os.listdir(folder)):
        stage = name.split("-", 1)[0]
        born, intervals = None, []
        with open(os.path.join(folder, name)) as f:
            for line in f:
                kind, *values = line.split()
                if kind == "born":
                    born = float(values[0]) if born is None else born
                else:
                    intervals.append((float(values[0]), float(values[1]), int(values[2])))
        workers.append({"stage": stage, "born": born, "intervals": sorted(intervals)})
    return workers


def union_within(intervals: list[tuple], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one interval (a worker's calls may overlap)."""
    covered, reach = 0.0, lo
    for start, end, _ in intervals:
        start, end = max(start, reach), min(end, hi)
        if end > start:
            covered += end - start
            reach = end
    return covered


def measure(workers: list[dict]) -> dict:
    """Steady end-to-end rate, and each stage's busy share after warm-up (see the module doc)."""
    ends = sorted((end, rows) for w in workers if w["stage"] == STAGES[-1]
                  for _, end, rows in w["intervals"])
    if len(ends) < 2:
        return {"rows_per_s": None, "busy": {}, "slowest": None}
    t0, t_end = ends[0][0], ends[-1][0]
    rate = sum(rows for _, rows in ends[1:]) / (t_end - t0)
    capacity = {}
    for stage in STAGES:
        mine = [w for w in workers if w["stage"] == stage and w["intervals"]]
        busy_s = sum(union_within(w["intervals"], 0, float("inf")) for w in mine)
        rows = sum(r for w in mine for _, _, r in w["intervals"])
        capacity[stage] = len(mine) * rows / busy_s if busy_s else float("inf")
    # Within 5%, the stages are balanced: the last one, which the split is built around, is
    # reported.
    slowest = min(capacity, key=capacity.get)
    if capacity[STAGES[-1]] <= 1.05 * capacity[slowest]:
        slowest = STAGES[-1]
    # The window ends when the slowest stage's first worker runs dry for good: after that its
    # idling is the input running out, not the scheduling.
    t1 = min(w["intervals"][-1][1] for w in workers if w["stage"] == slowest and w["intervals"])
    # A worker counts from when it was ready to its last shard: a worker that was retired
    # (reelfarm) or scaled down (Ray Data) leaves no record of when it stopped. For the
    # slowest stage this changes nothing: its every worker worked until t1 at least.
    busy, mean_workers = {}, {}
    for stage in STAGES:
        held = present = 0.0
        for w in workers:
            if w["stage"] != stage:
                continue
            lo = max(t0, w["born"] or t0)
            hi = min(t1, w["intervals"][-1][1]) if w["intervals"] else t1
            if hi > lo:
                held += union_within(w["intervals"], lo, hi)
                present += hi - lo
        busy[stage] = round(held / present, 4) if present else None
        mean_workers[stage] = round(present / (t1 - t0), 2) if t1 > t0 else None
    return {"rows_per_s": round(rate, 3), "window_s": round(t1 - t0, 2), "busy": busy,
            "slowest": slowest, "mean_workers": mean_workers,
            "capacity_rows_per_s": {s: round(c, 2) for s, c in capacity.items()},
            "workers_seen": {s: sum(w["stage"] == s and bool(w["intervals"]) for w in workers)
                             for s in STAGES},
            "first_busy": min(w["intervals"][0][0] for w in workers if w["intervals"]),
            "video_ready": sorted(w["born"] for w in workers if w["stage"] == STAGES[-1])}


def outputs_digest(out: str) -> dict:
    """How many keyframes and videos a run stored, and one sha256 over all of them (by path):
    equal digests say both contenders rendered and encoded exactly the same."""
    import hashlib

    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out)
                   for f in names if f.endswith((".png", ".mp4")))
    digest = hashlib.sha256()
    for relative in files:
        with open(os.path.join(out, relative), "rb") as f:
            digest.update(relative.encode() + hashlib.sha256(f.read()).digest())
    return {"png": sum(f.endswith(".png") for f in files),
            "mp4": sum(f.endswith(".mp4") for f in files), "sha256": digest.hexdigest()}


def summarize(runs: list[dict], workloads: dict) -> dict:
    """Per workload and contender: medians over rounds, and rate ratios to each Ray Data
    contender within a round."""
    summary = {}
    for workload, contenders in workloads.items():
        mine = [r for r in runs if r["workload"] == workload and r["ok"]]
        by_round: dict = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["contender"]] = r
        summary[workload] = {}
        for contender in contenders:
            runs_c = [r for r in mine if r["contender"] == contender]
            if not runs_c:
                continue
            row = {"rounds": len(runs_c),
                   "rows_per_s": round(median([r["rows_per_s"] for r in runs_c]), 3),
                   "rows_per_s_per_round": [r["rows_per_s"] for r in runs_c],
                   "slowest": runs_c[0]["slowest"],
                   "busy_slowest": round(median([r["busy"].get(r["slowest"]) for r in runs_c]), 4),
                   "busy_per_stage": {s: round(median([r["busy"].get(s) for r in runs_c]), 4)
                                      for s in STAGES},
                   "peak_rss_mib": round(median([r.get("peak_rss_mib") for r in runs_c]), 1),
                   "wall_s": round(median([r["wall_s"] for r in runs_c]), 2),
                   "workers_seen": runs_c[0]["workers_seen"]}
            if runs_c[0].get("stages"):
                row["workers_at_end"] = {s: v["workers"] for s, v in runs_c[0]["stages"].items()}
                row["workers_moved"] = [r.get("workers_moved") for r in runs_c]
            if runs_c[0].get("outputs"):
                row["outputs"] = runs_c[0]["outputs"]
                reference = [r["outputs"]["sha256"] for r in mine if r["contender"] == "reelfarm"]
                row["same_outputs_as_reelfarm"] = all(r["outputs"]["sha256"] in reference
                                                      for r in runs_c)
            for key in ("rebalanced_after_s", "moved_workers_ready_after_s"):
                if any(key in r for r in runs_c):
                    row[key] = [r.get(key) for r in runs_c]
            for reference in (c for c in contenders if c.startswith("raydata")):
                ratios = [rounds[contender]["rows_per_s"] / rounds[reference]["rows_per_s"]
                          for rounds in by_round.values()
                          if contender in rounds and reference in rounds
                          and rounds[reference]["rows_per_s"]]
                if ratios and contender != reference:
                    row[f"x_{reference}"] = round(median(ratios), 3)
            summary[workload][contender] = row
    return summary
