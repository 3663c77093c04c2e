"""How many Prometheus series a large job exports: a 64-worker, 2-stage job's metrics recorded
through a real local Ray's metrics agent (``jobs.run.metrics.JobMetrics``, as the driver records
them), then scraped from its endpoint and counted per metric.

The job is simulated, its figures are not: 64 GPU workers on 8 nodes of 8 GPUs (32 per stage),
every phase timed, CLIP scores on, every pool event, and failures and retries under
``--error-codes`` distinct codes per stage (a night with many kinds of failure). What exporting
costs the steady rate is measured by ``python -m bench.cpu_side_by_side --systems reelfarm
reelfarm-nometrics`` (RESULTS.md, section 8).

    python -m bench.metrics           # 64 workers, 2 stages, 6 error codes
    python -m bench.metrics --quick   # 8 workers: a smoke run
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request
from collections import Counter

from bench.common import machine, save

JOB = "bench-series"
STAGES = ("keyframe", "video")
EVENTS = ("joined", "lost_with_node", "drained", "retired_idle", "backups", "backups_first")


def _figures(workers: int, gpus_per_node: int) -> dict:
    """Live figures of a job whose workers each hold a GPU, split evenly between the stages."""
    per_stage = workers // len(STAGES)
    stages = []
    for s, name in enumerate(STAGES):
        gpus = [(f"10.0.0.{(s * per_stage + w) // gpus_per_node + 1}",
                 str((s * per_stage + w) % gpus_per_node), 30_000_000_000)
                for w in range(per_stage)]
        stages.append({"name": name, "states": {"busy": per_stage - 2, "ready": 1, "loading": 1},
                       "inflight": 128, "waiting": 64, "made": 1000, "failed": 10,
                       "rows_per_s": 2.0, "events": {e: 1 for e in EVENTS}, "gpus": gpus})
    return {"stages": stages, "to_do": 1_000_000, "committed": 1000, "failed": 20,
            "remaining": 999_000, "eta_s": 3600.0}


def record(workers: int, error_codes: int) -> None:
    """Everything the driver records over a night, for every label value it can take."""
    from jobs.run.metrics import JobMetrics
    from rendering.contract import Artifact, Result

    metrics = JobMetrics(JOB)
    codes = [f"error_{i}" for i in range(error_codes)]
    for name in STAGES:
        made = Result("row", True, [Artifact("video", "videos/x.mp4", 1_000_000, "0" * 64, "video")],
                      metrics={"clip_score": 31.5},
                      timings_s={"render_s": 40.0, "encode_s": 0.5, "upload_s": 0.2, "score_s": 0.1})
        metrics.made(name, made)
        metrics.recovered(name)
        for code in codes:
            metrics.retried(name, code)
    failed = [{"status": "failed", "failed_stage": stage, "error_code": code}
              for stage in (None, *STAGES) for code in codes]
    metrics.committed([{"status": "ok", "failed_stage": None, "error_code": None}, *failed])
    metrics.sample(_figures(workers, 8), time.time())


def count_series(url: str) -> Counter:
    """Series of the job on Ray's endpoint, per metric family."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("reelfarm_job") == JOB:
                counts[family.name] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--error-codes", type=int, default=6)
    args = parser.parse_args(argv)
    workers = args.workers or (8 if args.quick else 64)
    import ray

    with socket.socket() as probe:  # a free port for the metrics agent
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=port, log_to_driver=False)
    try:
        record(workers, args.error_codes)
        url, counts, deadline = f"http://127.0.0.1:{port}/metrics", Counter(), time.monotonic() + 60
        while time.monotonic() < deadline:  # the driver's metrics reach the agent in seconds
            counts = count_series(url)
            if counts.get("ray_reelfarm_worker_gpu"):
                time.sleep(2)  # one more export: everything recorded has arrived
                counts = count_series(url)
                break
            time.sleep(1)
    finally:
        ray.shutdown()
    total = sum(counts.values())
    result = {"machine": machine(), "workers": workers, "stages": len(STAGES),
              "error_codes": args.error_codes, "series": total, "by_metric": dict(counts)}
    print(json.dumps({"series": total, "by_metric": dict(counts)}, indent=2))
    print("saved", save("metrics" + ("_quick" if args.quick else ""), result))
    return 0 if total else 1


if __name__ == "__main__":
    sys.exit(main())
