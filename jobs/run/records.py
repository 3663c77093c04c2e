"""A planned row's manifest record: the row's parameters and what became of it, in the
columns the store commits (``jobs.store.manifest.SCHEMA``)."""

from __future__ import annotations

import dataclasses

from jobs import params
from jobs.input.plan import PlannedRow
from jobs.input.rows import RowFailure
from jobs.store.manifest import METRIC_COLUMNS
from rendering.contract import Result, Task


def record(row: PlannedRow) -> dict:
    """One manifest row: the planned row's parameters with what became of it (the result of
    the last stage it reached decides; the artifacts of every stage are kept)."""
    outcome = row.outcome
    result: Result | None = row.results[-1] if row.results else None
    if isinstance(outcome, Task):
        values = {**outcome.params, "seed": outcome.seed}
    else:
        values = outcome.params if isinstance(outcome, RowFailure) else {}
    metrics = result.metrics if result is not None else {}
    rec = {"key": outcome.key if isinstance(outcome, Task) else None,  # not stored
           "id": row.id, "row_index": row.index, "occurrence": row.occurrence,
           "prompt": row.prompt, **{p: values.get(p) for p in params.NAMES},
           "attempts": sum(s["attempts"] for s in row.stages), "video_uri": None,
           "bytes": None, "sha256": None, "artifacts": [], "render_s": None,
           "redo_of": row.redo_of, "stages": list(row.stages), "failed_stage": None,
           **{name: metrics.get(name) for name, _ in METRIC_COLUMNS}}
    if isinstance(outcome, Task):
        for role, media in outcome.inputs.items():
            rec[f"input_{role}_uri"] = media.uri
            rec[f"input_{role}_sha256"] = media.sha256 or metrics.get(f"input_{role}_sha256")
    if isinstance(outcome, RowFailure):
        rec.update(status="failed", error_code=outcome.error_code, error=outcome.error)
    elif result is not None and result.ok:
        video = result.artifact("video")
        rec.update(status="ok", error_code=None, error=None,
                   artifacts=[dataclasses.asdict(a) for r in row.results for a in r.artifacts],
                   video_uri=video.path, bytes=video.bytes, sha256=video.sha256,
                   render_s=result.timings_s.get("render_s"))
    else:
        # What earlier stages stored stays recorded (and verified): a keyframe is kept.
        rec.update(status="failed", error_code=result.error_code if result else "unknown",
                   error=result.error if result else "unknown: no result",
                   failed_stage=row.stages[-1]["name"] if row.stages else None,
                   artifacts=[dataclasses.asdict(a) for r in row.results if r.ok
                              for a in r.artifacts])
    rec.update({f"carry.{k}": v for k, v in row.carry.items()})
    return rec
