"""``reelfarm status``: what an output holds, counted from its manifests, and its last run."""

from __future__ import annotations

import pyarrow.compute as pc

from jobs.store import layout, manifest
from jobs.store.job_file import read_job, require_output
from jobs.store.lease import holder
from rendering import storage


def status(output_uri: str, top: int = 5, must_exist: bool = True) -> dict:
    """Counts by status, the most common errors, the ok rows the quality gate kept below its
    ``min_score``, the last run's figures, and the run holding the output now, if any, with the
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
            "min_score": (job.get("config", {}).get("quality") or {}).get("min_score"),
            "expected_rows": job.get("counts", {}).get("rows"),
            "last_run": job.get("last_run"),
            "running": holder(output_uri),
            "complete": fs.exists(storage.join(root, layout.SUCCESS_FILE))}


def failed_rows(output_uri: str):
    """(id, error) of every row whose current commit failed, in input order, streaming."""
    for table in manifest.current_rows(output_uri, ["id", "status", "error"]):
        for row in table.filter(pc.equal(table["status"], "failed")).to_pylist():
            yield row["id"], row["error"]
