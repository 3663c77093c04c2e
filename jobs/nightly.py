"""The nightly job: one night's prompt dataset rendered to that night's output prefix.

A scheduler (cron, a Kubernetes CronJob, KubeRay) runs ``reelfarm nightly CONFIG`` once a night.
``{date}`` in ``input.uri`` and ``output.uri`` becomes the night's date (today in UTC unless
``--date`` names one, for backfills), so each night reads its own dataset and writes its own
prefix; ``{date:%Y/%m/%d}`` picks another layout. Running the same night again resumes it:
committed rows are kept, only the rest render, and a complete night renders nothing.

Every attempt, however it ends, rewrites ``nightly.json`` under the output prefix: the night's
counts, its most common failures, videos per hour, and each attempt's outcome, for the
scheduler's checks and for whoever reads the morning report.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from jobs.store import layout
from jobs.status import status as output_status
from jobs.config import ConfigError, JobConfig, redact
from jobs.driver import render
from jobs.store.job_file import read_job, read_json
from rendering import storage

logger = logging.getLogger(__name__)

SUMMARY_FILE = "nightly.json"


def night_of(value: str | None) -> dt.date:
    """The night to render: ``YYYY-MM-DD``, or today in UTC (schedulers run in UTC)."""
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--date {value!r}: expected YYYY-MM-DD, e.g. 2025-06-30") from None


def for_night(cfg: JobConfig, night: dt.date) -> JobConfig:
    """The job config of one night: ``{date}`` filled in; the output prefix must be dated."""
    if "{date" not in cfg.output.uri:
        raise ConfigError(f"output.uri: a nightly job needs {{date}} in it, so that each night "
                          f"writes its own prefix (got {cfg.output.uri!r}; e.g. "
                          f"s3://bucket/renders/{{date}})")
    dated = cfg.model_copy(deep=True)
    dated.input.uri = _fill(cfg.input.uri, night, "input.uri")
    dated.output.uri = _fill(cfg.output.uri, night, "output.uri")
    return dated


def run(cfg: JobConfig, night: dt.date, progress: bool = True) -> dict:
    """Render (or resume) the night, write its summary, and return it.

    A failed or interrupted attempt is recorded too, then its error is raised again.
    """
    cfg = for_night(cfg, night)
    attempts = _previous_attempts(cfg.output.uri)
    attempt = {"attempt": len(attempts) + 1, "started_at": _now(), "status": "running"}
    if attempts and not attempts[-1]["status"].startswith("complete"):
        logger.info("resuming %s: attempt %d of the night of %s was %s", cfg.output.uri,
                    attempts[-1]["attempt"], night, attempts[-1]["status"])
    started = time.time()
    try:
        result = render(cfg, progress=progress)
    except BaseException as exc:
        attempt.update(status="interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "failed", error=redact(" ".join(str(exc).split())) or type(exc).__name__)
        _finish_attempt(attempt, started, cfg.output.uri)
        _write_quietly(cfg, night, attempts + [attempt])
        raise
    # The attempt's status reads like the night's: complete, complete_with_failures, incomplete.
    attempt.update(status=_night_status(result.complete, result.failed), skipped=result.skipped)
    _finish_attempt(attempt, started, cfg.output.uri)
    return write_summary(cfg, night, attempts + [attempt])


def write_summary(cfg: JobConfig, night: dt.date, attempts: list[dict]) -> dict:
    """Write ``nightly.json``: the night's state read back from its output, and its attempts."""
    state = output_status(cfg.output.uri, must_exist=False)  # a night that failed at once has none
    by_status = state["by_status"]
    rows = state["expected_rows"]
    ok, failed = by_status.get("ok", 0), by_status.get("failed", 0)
    rendered = sum(a.get("rendered") or 0 for a in attempts)
    seconds = sum(a.get("seconds") or 0 for a in attempts)
    summary = {
        "date": night.isoformat(),
        "status": _night_status(state["complete"], failed),
        "input_uri": cfg.input.uri,
        "output_uri": cfg.output.uri,
        "rows": rows,
        "ok": ok,
        "failed": failed,
        "pending": None if rows is None else rows - ok - failed,
        "top_errors": [{"error_code": code, "count": n, "example": redact(example or "")}
                       for code, n, example in state["top_errors"]],
        "rendered": rendered,
        "seconds": round(seconds, 3),
        "videos_per_hour": round(3600 * rendered / seconds, 1) if seconds > 0 else None,
        "attempts": attempts,
        "manifest_uri": storage.join(cfg.output.uri, layout.MANIFEST_FILE),
        "updated_at": _now(),
    }
    fs, root = storage.filesystem(cfg.output.uri)
    storage.write_bytes(fs, storage.join(root, SUMMARY_FILE),
                        json.dumps(summary, indent=2).encode())
    return summary


def read_summary(output_uri: str) -> dict | None:
    return read_json(output_uri, SUMMARY_FILE)


def _night_status(complete: bool, failed: int) -> str:
    """complete: every row ok; complete_with_failures: every row final, some failed;
    incomplete: rows are still to do (rerun the same night to resume)."""
    if not complete:
        return "incomplete"
    return "complete_with_failures" if failed else "complete"


def _previous_attempts(output_uri: str) -> list[dict]:
    try:
        previous = read_summary(output_uri)
    except ValueError:  # a summary cut short or edited by hand: start the history afresh
        logger.warning("%s/%s is not valid JSON: starting a new attempt history", output_uri,
                       SUMMARY_FILE)
        return []
    return list(previous["attempts"]) if previous else []


def _finish_attempt(attempt: dict, started: float, output_uri: str) -> None:
    """Time the attempt and count the ok rows it committed, however it ended."""
    seconds = time.time() - started
    rendered = _committed_since(output_uri, started)
    attempt.update(finished_at=_now(), seconds=round(seconds, 3), rendered=rendered,
                   videos_per_hour=round(3600 * rendered / seconds, 1)
                   if rendered is not None and seconds > 0 else None)


def _committed_since(output_uri: str, started: float) -> int | None:
    """Ok rows the run that began after ``started`` committed: rendered, or recovered from an
    earlier attempt's stored videos. The driver records both in ``job.json``, even for a run
    that failed or was interrupted."""
    try:
        run = (read_job(output_uri) or {}).get("last_run") or {}
    except Exception as exc:  # noqa: BLE001 - storage may be what failed the attempt
        logger.warning("could not read the run record of %s: %s", output_uri, redact(str(exc)))
        return None
    if run.get("started_at", 0) < started:
        return 0  # the attempt stopped before it rendered anything
    return (run.get("rendered") or 0) + (run.get("recovered") or 0)


def _write_quietly(cfg: JobConfig, night: dt.date, attempts: list[dict]) -> None:
    """Record a failed attempt if storage allows; never mask the error that ended it."""
    try:
        write_summary(cfg, night, attempts)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not write %s: %s", SUMMARY_FILE, redact(str(exc)))


def _fill(uri: str, night: dt.date, key: str) -> str:
    try:
        return uri.format_map({"date": night})
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"{key}: only {{date}} or {{date:FORMAT}} may appear in braces "
                          f"(got {uri!r}: {exc})") from None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
