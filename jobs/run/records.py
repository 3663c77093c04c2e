"""A planned row's manifest record: the row's parameters and what became of it, in the
columns the store commits (``jobs.store.manifest.SCHEMA``)."""

from __future__ import annotations

import dataclasses
import json

from jobs import params
from jobs.input.plan import PlannedRow
from jobs.input.rows import RowFailure
from jobs.store.manifest import METRIC_COLUMNS
from rendering.contract import MEDIA_ROLES, Artifact, Result, Task


def record(row: PlannedRow) -> dict:
    """One manifest row: the planned row's parameters with what became of it (the result of
    the last stage it reached decides; the artifacts of every stage are kept)."""
    outcome = row.outcome
    result: Result | None = row.results[-1] if row.results else None
    if isinstance(outcome, Task):
        values = {**outcome.params, "seed": outcome.seed}
    else:
        values = outcome.params if isinstance(outcome, RowFailure) else {}
    metrics = _merged_metrics(row.results)
    rec = {"key": outcome.key if isinstance(outcome, Task) else None,  # not stored
           "id": row.id, "row_index": row.index, "occurrence": row.occurrence,
           "source_id": row.source_id, "variation": row.variation,
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
        rec.update(status="failed", error_code=outcome.error_code, error=outcome.error,
                   failed_stage=outcome.stage)
        if outcome.stage is not None:  # refused before that stage rendered it (no size)
            rec["stages"] = [{"name": outcome.stage, "status": "failed", "attempts": 0,
                              "seconds": 0.0, "height": None, "width": None}]
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


def _merged_metrics(results: list[Result]) -> dict:
    """What the workers measured of the row, every stage's: a later stage's value wins, a value
    only an earlier stage measured (a keyframe's safety flag) is kept, and a picture flagged in
    any stage flags the row, with every stage's safety retries counted."""
    merged: dict = {}
    for result in results:
        merged.update((k, v) for k, v in result.metrics.items() if v is not None)
    flags = [r.metrics.get("safety_flagged") for r in results]
    if any(f is not None for f in flags):
        merged["safety_flagged"] = any(flags)
        merged["safety_retries"] = sum(r.metrics.get("safety_retries") or 0 for r in results)
    return merged


def kept_artifacts(replaced: dict | None, task: Task) -> list[Artifact]:
    """What the commit a repair replaces had stored, when it answered this very ``task`` (the
    same prompt, parameters, seed and inputs): a failed row's keyframe is taken up again, not
    made again. Artifacts recorded before they carried their kind are not."""
    if not replaced or not replaced.get("artifacts") or _task_of(replaced) != _comparable(task):
        return []
    return [Artifact(**a) for a in replaced["artifacts"] if a.get("kind")]


def _task_of(committed: dict) -> dict:
    """The identity of the task a committed row answered, as ``Task.identity`` has it."""
    inputs = {}
    for role in MEDIA_ROLES:
        uri, sha256 = committed.get(f"input_{role}_uri"), committed.get(f"input_{role}_sha256")
        if uri or sha256:
            inputs[role] = f"uri:{uri}" if uri else f"sha256:{sha256}"
    return {"id": committed["id"], "seed": committed["seed"], "prompt": committed["prompt"],
            "params": {p: committed.get(p) for p in params.NAMES if p != "seed"},
            "inputs": inputs}


def _comparable(task: Task) -> dict:
    identity = {k: v for k, v in task.identity().items() if k != "key"}
    identity["params"] = {p: task.params.get(p) for p in params.NAMES if p != "seed"}
    return json.loads(json.dumps(identity))
