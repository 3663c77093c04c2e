"""The output prefix: its ``job.json`` (what made it) and ``_SUCCESS`` (that it is complete).

An existing output may only be resumed by the settings that made it: the fingerprint of the
output-affecting config is kept in ``job.json`` and a mismatch is refused, naming what changed.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import metadata

from jobs.config import JobConfig, fingerprint, fingerprint_fields
from jobs.store.layout import JOB_FILE, MANIFESTS_DIR, RECEIPTS_DIR, SUCCESS_FILE
from jobs.store.segments import read_committed
from rendering import storage

logger = logging.getLogger(__name__)

# The version of the output's layout and manifests. Outputs written before it was recorded are
# version 1. A change of format raises it and migrates older outputs explicitly; tests/golden/
# holds outputs of earlier versions that must keep resuming, verifying and repairing.
# 2: committed shards are folded into segments behind a checkpoint. 3: WebDataset tars may leave
# out the rows duplicates.parquet marks (output.webdataset.skip_duplicates), whose entries name
# the commits they judged; a version 2 output is one already (it has no such tars).
FORMAT_VERSION = 3

_VERSIONED = ("reelfarm", "diffusers", "torch", "transformers", "ray", "pyarrow", "fsspec")


class OutputError(ValueError):
    """The output cannot be used for this job; the message says why and what to do."""


def versions() -> dict[str, str | None]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_job(output_uri: str) -> dict | None:
    """``job.json``, refused when a newer reelfarm wrote the output in a format this one does
    not know (reading it as an older one would misread it)."""
    job = read_json(output_uri, JOB_FILE)
    version = (job or {}).get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise OutputError(f"output {output_uri} is in format {version!r}, newer than this "
                          f"reelfarm reads (up to {FORMAT_VERSION}): upgrade reelfarm to use it")
    return job


def read_json(output_uri: str, name: str) -> dict | None:
    """A JSON object reelfarm keeps under the output (``job.json``, ``nightly.json``), if any."""
    fs, root = storage.filesystem(output_uri)
    path = storage.join(root, name)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise OutputError(f"{storage.to_uri(fs, path)} is not valid JSON ({exc}): "
                          f"it was not written by reelfarm, or was edited") from None


def require_output(output_uri: str) -> None:
    """Refuse a path that holds no reelfarm output: a typo is an error, not an empty output."""
    fs, root = storage.filesystem(output_uri)
    if not fs.exists(storage.join(root, JOB_FILE)) and read_committed(fs, root).empty:
        raise OutputError(f"{output_uri} holds no reelfarm output (no {JOB_FILE}, no "
                          f"{MANIFESTS_DIR}/): check the path")


def check_resumable(cfg: JobConfig, job: dict | None) -> None:
    """Refuse an output made with different output-affecting settings, unless it holds no work
    of them: a run that failed before committing or storing a row (a typo in a setting found at
    model load) does not claim the output for its settings."""
    if job is None or job.get("fingerprint") == fingerprint(cfg):
        return
    before = job.get("settings", {})
    now = fingerprint_fields(cfg)
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
               for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not _holds_work(cfg.output.uri):
        logger.warning("output %s holds no committed or stored row of the settings it was started "
                       "with; it is taken over by these (%s)", cfg.output.uri,
                       "; ".join(changed) or "fingerprint differs")
        return
    raise OutputError(f"output {cfg.output.uri} was rendered with other settings "
                      f"({'; '.join(changed) or 'fingerprint differs'}): render to a new "
                      f"output.uri, or restore the settings to resume it")


def _holds_work(output_uri: str) -> bool:
    """A shard manifest is committed, or a receipt says a row's objects are stored."""
    fs, root = storage.filesystem(output_uri)
    receipts = storage.join(root, RECEIPTS_DIR)
    return not read_committed(fs, root).empty or (fs.isdir(receipts) and bool(fs.find(receipts)))


def start_job(cfg: JobConfig, job: dict | None, planned_rows: int) -> dict:
    """Write (or update) ``job.json`` at the start of a run; this also proves we can write."""
    now = time.time()
    job = dict(job or {"created_at": now})
    job.update(format_version=FORMAT_VERSION, fingerprint=fingerprint(cfg),
               settings=fingerprint_fields(cfg),
               config=cfg.model_dump(mode="json"), versions=versions(),
               last_run={"started_at": now, "status": "running", "input_rows": planned_rows})
    try:
        write_job(cfg.output.uri, job)
    except OSError as exc:
        raise unwritable(cfg.output.uri, exc) from exc
    return job


def finished_before(output_uri: str, job: dict | None, input_signature: str) -> bool:
    """The output is complete for this very input: a run finished it, nothing was committed
    since (``_SUCCESS`` stands), and the input's files are as that run read them."""
    if not job or job.get("input_signature") != input_signature:
        return False
    fs, root = storage.filesystem(output_uri)
    return job.get("last_run", {}).get("status") == "finished" and \
        fs.exists(storage.join(root, SUCCESS_FILE))


def unwritable(output_uri: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write to output {output_uri} ({exc.strerror or exc}): choose a "
                       f"writable output.uri (or --output), or fix its permissions")


def finish_job(cfg: JobConfig, job: dict, status: str, counts: dict, work: dict,
               complete: bool, input_signature: str | None = None) -> dict:
    """Record how the run ended; write ``_SUCCESS`` once every input row is accounted for.

    ``work`` holds the run's own figures: rendered, recovered, workers_replaced, startup_s and
    rendering_s; videos/hour is over rendering_s, start-up left out. A complete output keeps
    its input's signature: a rerun on the same input has nothing to do (``finished_before``).
    """
    job["input_signature"] = input_signature if complete else None
    now = time.time()
    run = job["last_run"]
    elapsed = now - run["started_at"]
    rendered, rendering_s = work.get("rendered", 0), work.get("rendering_s", 0)
    run.update(status=status, finished_at=now, seconds=round(elapsed, 3), **work,
               videos_per_hour=round(3600 * rendered / rendering_s, 1) if rendering_s > 0 else None)
    job["counts"] = counts
    write_job(cfg.output.uri, job)
    if complete:
        fs, root = storage.filesystem(cfg.output.uri)
        storage.write_bytes(fs, storage.join(root, SUCCESS_FILE), b"")
    return job


def write_job(output_uri: str, job: dict) -> None:
    fs, root = storage.filesystem(output_uri)
    storage.write_bytes(fs, storage.join(root, JOB_FILE),
                        json.dumps(job, indent=2, sort_keys=True).encode())
