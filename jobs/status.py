"""``reelfarm status``: what an output holds, counted from its manifests, its last run, and what
the run holding it now says of itself."""

from __future__ import annotations

import time

import pyarrow.compute as pc

from jobs.run.metrics import WORKER_STATES
from jobs.run.progress import duration
from jobs.store import layout, manifest
from jobs.store.job_file import read_job, require_output
from jobs.store.lease import holder
from rendering import storage


def status(output_uri: str, top: int = 5, must_exist: bool = True) -> dict:
    """Counts by status, the most common errors, the ok rows the quality gate kept short of its
    rules (and the job's quality section, which names them), the last run's figures, and the run holding the output now, if any, with the
    live figures it last wrote (``running``). ``must_exist``: a path that holds no output is an
    error (a typo), not an output of zero rows."""
    fs, root = storage.filesystem(output_uri)
    if must_exist:
        require_output(output_uri)
    counts = manifest.tally(output_uri)
    job = read_job(output_uri) or {}
    return {"rows": counts.rows, "by_status": dict(counts.by_status),
            "top_errors": counts.top_errors(top),
            "by_stage": {name: dict(c) for name, c in counts.by_stage.items()},
            "kept_below": dict(counts.kept_below),
            "quality": job.get("config", {}).get("quality") or {},
            "expected_rows": job.get("counts", {}).get("rows"),
            "last_run": job.get("last_run"),
            "running": holder(output_uri),
            "complete": fs.exists(storage.join(root, layout.SUCCESS_FILE))}


def failed_rows(output_uri: str):
    """(id, error) of every row whose current commit failed, in input order, streaming."""
    for table in manifest.current_rows(output_uri, ["id", "status", "error"]):
        for row in table.filter(pc.equal(table["status"], "failed")).to_pylist():
            yield row["id"], row["error"]


def print_running(lease: dict) -> None:
    """What the run holding the output said of itself with its last lease renewal."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lease["started_at"]))
    print(f"running since {since} on {lease.get('host')} (pid {lease.get('pid')}), "
          f"figures of {max(0, round(time.time() - lease['renewed_at']))} s ago")
    live = lease.get("live")
    if not live:
        print("  workers starting")
        return
    eta = live.get("eta_s")
    print(f"  {live['committed']} of {live['to_do']} rows committed by this run, "
          f"{live['failed']} failed" + (f", ETA {duration(eta)}" if eta is not None else ""))
    for stage in live["stages"]:
        rate = stage.get("rows_per_s")
        workers = ", ".join(f"{stage['states'][state]} {state}" for state in WORKER_STATES
                            if stage["states"].get(state))
        print(f"  {stage['name']}: " + (f"{rate:.2f} rows/s, " if rate is not None else "")
              + f"workers {workers or 'none'}; {stage['inflight']} rows in flight, "
              f"{stage['waiting']} waiting")


# How ``status`` says what the pools did as the cluster changed (job.json's capacity figures).
CAPACITY_EVENTS = {"joined": "placed as capacity appeared",
                    "lost_with_node": "lost with their node (not counted against rows)",
                    "drained": "handed back their shards before a drain's deadline",
                    "retired_idle": "retired idle at the tail",
                    "backups": "took a backup copy of a late shard at the tail",
                    "backups_first": "of those finished first (the other copy stopped)"}
