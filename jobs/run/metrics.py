"""What a running job tells Prometheus, through Ray's metrics (``ray.util.metrics``): they travel
with Ray's own from every node's metrics agent, so a cluster already scraped needs nothing more.

The names, types and labels below are a contract, like the manifest's columns: the README's
table, the Grafana dashboard and the alert rules in ``cluster/monitoring/`` read them. Ray adds
``ray_`` in front of every name it exports. A job is labelled ``reelfarm_job`` (the output's
name, or ``metrics.job_name``), not ``job``: Prometheus gives every scraped series the scrape
job's ``job`` label and would rename ours ``exported_job``. Counters are recorded as rows
settle; gauges are set from the scheduler's live figures every few seconds and once more at
the end. Without Ray (the inline backend) or with ``metrics.enabled: false``, nothing is
recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

WORKER_STATES = ("pending", "loading", "ready", "busy", "retiring")
PHASES = ("render", "encode", "upload", "score")  # a row's worker seconds, from its timings
_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600, 1200, 3600)
_SCORES = tuple(range(5, 100, 5))


@dataclass(frozen=True)
class Metric:
    name: str  # as defined; exported as ray_<name>
    kind: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    meaning: str
    boundaries: tuple = ()  # histograms' bucket bounds


METRICS = (
    Metric("reelfarm_rows_committed_total", "counter", ("reelfarm_job", "status"),
           "rows committed to the manifest by this run, ok or failed (recovered ones included)"),
    Metric("reelfarm_rows_failed_total", "counter", ("reelfarm_job", "stage", "error_code"),
           "rows committed as failed, by the stage that failed them (input: refused before any "
           "stage) and error code"),
    Metric("reelfarm_rows_made_total", "counter", ("reelfarm_job", "stage"),
           "rows a stage rendered and stored"),
    Metric("reelfarm_rows_retried_total", "counter", ("reelfarm_job", "stage", "error_code"),
           "row attempts that failed and were queued again (lost_with_node: the worker's node "
           "went away)"),
    Metric("reelfarm_rows_recovered_total", "counter", ("reelfarm_job", "stage"),
           "rows an interrupted run had stored, taken up from their receipts"),
    Metric("reelfarm_bytes_written_total", "counter", ("reelfarm_job", "stage"),
           "bytes of the artifacts a stage stored"),
    Metric("reelfarm_pool_events_total", "counter", ("reelfarm_job", "stage", "event"),
           "how a stage's pool followed its cluster: joined, lost_with_node, drained, "
           "retired_idle, backups, backups_first"),
    Metric("reelfarm_row_seconds", "histogram", ("reelfarm_job", "stage", "phase"),
           "worker seconds per row by phase: render, encode, upload, score", _SECONDS),
    Metric("reelfarm_clip_score", "histogram", ("reelfarm_job", "stage"),
           "CLIP score (0-100) of each scored row, when quality scoring is on", _SCORES),
    Metric("reelfarm_workers", "gauge", ("reelfarm_job", "stage", "state"),
           "workers by state: pending (not placed), loading, ready, busy, retiring"),
    Metric("reelfarm_rows_inflight", "gauge", ("reelfarm_job", "stage"),
           "rows in the shards a stage's workers hold"),
    Metric("reelfarm_rows_waiting", "gauge", ("reelfarm_job", "stage"),
           "rows waiting for a stage: handed on by the one before, or queued for a retry"),
    Metric("reelfarm_rows_to_do", "gauge", ("reelfarm_job",),
           "rows this run set out to finish (the input less what earlier runs committed)"),
    Metric("reelfarm_rows_remaining", "gauge", ("reelfarm_job",), "rows of those not yet committed"),
    Metric("reelfarm_eta_seconds", "gauge", ("reelfarm_job",),
           "seconds to the last commit at the rate since the workers were ready"),
    Metric("reelfarm_last_commit_timestamp_seconds", "gauge", ("reelfarm_job",),
           "Unix time of the last manifest commit (before the first: of the run's start)"),
    Metric("reelfarm_lease_renewed_timestamp_seconds", "gauge", ("reelfarm_job",),
           "Unix time of the driver's last renewal of its lease on the output"),
    Metric("reelfarm_worker_gpu", "gauge", ("reelfarm_job", "stage", "ip", "GpuIndex"),
           "1 for each GPU a loaded worker holds: joins Ray's ray_node_gpus_utilization"),
    Metric("reelfarm_gpu_memory_peak_bytes", "gauge", ("reelfarm_job", "stage", "ip", "GpuIndex"),
           "the most CUDA memory a worker has allocated (CUDA workers only)"),
)
BY_NAME = {m.name: m for m in METRICS}


class JobMetrics:
    """The job's metrics, made on first use (Ray is connected only when workers start)."""

    def __init__(self, job: str, enabled: bool = True, clock=time.time):
        self.job = job
        self._enabled = enabled
        self._clock = clock
        self._made: dict | None = None
        self._events: dict[tuple[str, str], int] = {}  # (stage, event) -> count exported
        self._gpus: set[tuple[str, str, str]] = set()  # (stage, ip, index) set to 1 last time
        self._last_commit = clock()  # the run's start, until its first commit
        self._pending: dict[tuple, float] = {}  # counters recorded before Ray was connected

    def _instruments(self) -> dict | None:
        if self._made is None and self._enabled:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util import metrics

            kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge,
                     "histogram": metrics.Histogram}
            self._made = {}
            for m in METRICS:
                extra = {"boundaries": list(m.boundaries)} if m.boundaries else {}
                self._made[m.name] = kinds[m.kind](m.name, description=m.meaning,
                                                   tag_keys=m.labels, **extra)
        return self._made

    def _record(self, name: str, value: float, **labels) -> None:
        kind = BY_NAME[name].kind
        tags = {"reelfarm_job": self.job, **{k: str(v) for k, v in labels.items()}}
        made = self._instruments()
        if made is None:
            # Rows committed before Ray is connected (refused at input): counted once it is.
            if self._enabled and kind == "counter":
                key = (name, tuple(sorted(tags.items())))
                self._pending[key] = self._pending.get(key, 0) + value
            return
        for (pending, pending_tags), count in self._pending.items():
            if count:
                made[pending].inc(count, tags=dict(pending_tags))
        self._pending.clear()
        metric = made[name]
        if kind == "counter":
            if value:
                metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)

    # --- as rows settle ---------------------------------------------------------------------
    def committed(self, records: list[dict]) -> None:
        ok = sum(r["status"] == "ok" for r in records)
        self._record("reelfarm_rows_committed_total", ok, status="ok")
        self._record("reelfarm_rows_committed_total", len(records) - ok, status="failed")
        for r in records:
            if r["status"] != "ok":
                self._record("reelfarm_rows_failed_total", 1, stage=r["failed_stage"] or "input",
                             error_code=r["error_code"] or "unknown")
        self._last_commit = self._clock()
        self._record("reelfarm_last_commit_timestamp_seconds", self._last_commit)

    def made(self, stage: str, result) -> None:
        """A stage's result for a row: what it stored, how long each phase took, its score."""
        if not result.ok:
            return
        self._record("reelfarm_rows_made_total", 1, stage=stage)
        self._record("reelfarm_bytes_written_total", sum(a.bytes for a in result.artifacts),
                     stage=stage)
        for phase in PHASES:
            seconds = result.timings_s.get(f"{phase}_s")
            if seconds is not None:
                self._record("reelfarm_row_seconds", seconds, stage=stage, phase=phase)
        score = result.metrics.get("clip_score")
        if score is not None:
            self._record("reelfarm_clip_score", score, stage=stage)

    def retried(self, stage: str, error_code: str, rows: int = 1) -> None:
        self._record("reelfarm_rows_retried_total", rows, stage=stage, error_code=error_code)

    def recovered(self, stage: str) -> None:
        self._record("reelfarm_rows_recovered_total", 1, stage=stage)

    # --- every few seconds, from the scheduler's live figures ----------------------------
    def sample(self, figures: dict, lease_renewed_at: float | None) -> None:
        """Set the gauges from the scheduler's live figures (``Scheduler.sample``) and the time
        of the lease's last renewal."""
        stages = figures["stages"]
        for stage in stages:
            name = stage["name"]
            for state in WORKER_STATES:
                self._record("reelfarm_workers", stage["states"].get(state, 0), stage=name,
                             state=state)
            self._record("reelfarm_rows_inflight", stage["inflight"], stage=name)
            self._record("reelfarm_rows_waiting", stage["waiting"], stage=name)
            for event, count in stage["events"].items():
                before = self._events.get((name, event), 0)
                self._record("reelfarm_pool_events_total", count - before, stage=name,
                             event=event)
                self._events[(name, event)] = count
            for ip, index, peak in stage["gpus"]:
                if peak is not None:
                    self._record("reelfarm_gpu_memory_peak_bytes", peak, stage=name, ip=ip,
                                 GpuIndex=index)
        held = {(s["name"], ip, index) for s in stages for ip, index, _ in s["gpus"]}
        for name, ip, index in held | self._gpus:  # a GPU given back reads 0, not its last 1
            self._record("reelfarm_worker_gpu", int((name, ip, index) in held), stage=name,
                         ip=ip, GpuIndex=index)
        self._gpus = held
        self._record("reelfarm_rows_to_do", figures["to_do"])
        self._record("reelfarm_rows_remaining", figures["remaining"])
        if figures["eta_s"] is not None:
            self._record("reelfarm_eta_seconds", figures["eta_s"])
        self._record("reelfarm_last_commit_timestamp_seconds", self._last_commit)
        if lease_renewed_at is not None:
            self._record("reelfarm_lease_renewed_timestamp_seconds", lease_renewed_at)
