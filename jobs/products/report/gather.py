"""What the report shows, gathered from the committed manifests a shard at a time.

Bounded at any size: what is kept is fixed in size. The gallery is a deterministic sample (the
ok rows whose ``row_hash`` is smallest, so the same output always shows the same videos), each
score's lowest rows are kept in a heap, histograms widen their bins as the range grows, counts
are kept per error code and per quality rule (small vocabularies, capped), and prompts and
errors are cut to a few hundred characters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import params
from jobs.products.report.bins import Bins, time_widths
from jobs.products.report.media import media_links
from jobs.products.report.scores import SCORE_COLUMNS, Distribution
from jobs.products.report.smallest import Smallest
from jobs.products.report.text import ERROR_CHARS, ID_CHARS, PROMPT_CHARS, cut
from jobs.store import manifest
from jobs.store.hashset import row_hashes

SCORE_COLUMN = "clip_score"  # the gallery's score, and the one the gate's tries record
KEPT_ROWS = 100  # rows kept below quality.min_score listed (all are counted)
ERROR_EXAMPLES = 3  # example rows shown per error code
MAX_ERROR_CODES = 50  # codes kept apart; more are counted together (codes are a small vocabulary)
MAX_RULES = 50  # rules kept apart (a config names a few); more are counted together
# The throughput histogram keeps at most this many bins: past it, bins widen to the next width
# (an exact multiple of the last, so merged counts stay exact).
TIME_BINS = 120


@dataclass
class Gathered:
    """What the page shows, gathered from the manifests one shard at a time."""

    sample_size: int = 48
    rows: int = 0
    ok: int = 0
    by_status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error code -> failed rows
    examples: dict = field(default_factory=dict)  # error code -> its first few rows
    first_commit: float | None = None
    last_commit: float | None = None
    throughput: Bins = field(default_factory=lambda: Bins(time_widths(), TIME_BINS))
    scores: dict = field(default_factory=lambda: {c: Distribution(c) for c in SCORE_COLUMNS})
    static: int = 0  # ok rows flagged motion_static
    gate: manifest.Tally = field(default_factory=manifest.Tally)  # its kept_below counts only
    kept: list = field(default_factory=list)  # the first KEPT_ROWS rows kept below the gate
    rule_misses: dict = field(default_factory=dict)  # rule -> Counter of status -> rows missing it
    retried: int = 0  # rows the gate rendered again
    extra_renders: int = 0  # the renders it made for them, past each row's first
    duplicates: int = 0  # ok rows marked duplicate_of an earlier row (by reelfarm dedup)
    _sample: Smallest = field(init=False)

    def __post_init__(self):
        self._sample = Smallest(self.sample_size)

    def add(self, table: pa.Table) -> None:
        """Take in one shard's committed rows."""
        self.rows += table.num_rows
        status = table["status"]
        self.by_status.update({s: n for s, n in zip(*_value_counts(status)) if s is not None})
        times = pc.min_max(table["committed_at"]).as_py()
        if times["min"] is not None:
            self.first_commit = min(times["min"], self.first_commit or times["min"])
            self.last_commit = max(times["max"], self.last_commit or times["max"])
        self._add_failures(table.filter(pc.fill_null(pc.equal(status, "failed"), False)))
        self._add_rules(table)
        ok = table.filter(pc.fill_null(pc.equal(status, "ok"), False))
        self.ok += ok.num_rows
        if ok.num_rows == 0:
            return
        self.throughput.add(ok["committed_at"].to_numpy(zero_copy_only=False))
        self._add_kept(self.gate.add_gate(ok))
        hashes = row_hashes(ok)
        clip = _column(ok, SCORE_COLUMN)
        self._sample.offer(hashes, lambda picked: _rows(ok, picked, clip))
        for name, distribution in self.scores.items():
            values = _column(ok, name)
            if values is not None:
                distribution.add(values, hashes, lambda picked, v=values: _rows(ok, picked, v))
        if "motion_static" in ok.column_names:
            self.static += pc.sum(ok["motion_static"]).as_py() or 0
        if "duplicate_of" in ok.column_names:
            self.duplicates += ok.num_rows - ok["duplicate_of"].null_count

    def _add_failures(self, failed: pa.Table) -> None:
        wanted: list[tuple[str, int]] = []  # (code, index) of this shard's examples
        for index, code in enumerate(failed["error_code"].to_pylist()):
            code = code or "unknown"
            if code not in self.errors and len(self.errors) >= MAX_ERROR_CODES:
                code = "(other codes)"
            self.errors[code] += 1
            taken = len(self.examples.get(code, ())) + sum(c == code for c, _ in wanted)
            if taken < ERROR_EXAMPLES:
                wanted.append((code, index))
        for (code, _), row in zip(wanted, _rows(failed, [i for _, i in wanted])):
            self.examples.setdefault(code, []).append(row)

    def _add_kept(self, kept: pa.Table | None) -> None:
        if kept is None or len(self.kept) >= KEPT_ROWS:
            return
        head = kept.slice(0, KEPT_ROWS - len(self.kept))
        self.kept += _rows(head, list(range(head.num_rows)), _column(head, SCORE_COLUMN))

    def _add_rules(self, table: pa.Table) -> None:
        """Count the rows missing each quality rule (``quality_failed_rules``), by status, and
        the rows the gate rendered again (``quality_tries``), in Arrow."""
        if "quality_tries" in table.column_names:
            tries = pc.fill_null(pc.list_value_length(table["quality_tries"]), 0)
            again = pc.greater(tries, 1)
            self.retried += pc.sum(again).as_py() or 0
            self.extra_renders += pc.sum(pc.subtract(pc.filter(tries, again), 1)).as_py() or 0
        if "quality_failed_rules" not in table.column_names:
            return
        lists = table["quality_failed_rules"].combine_chunks()
        missed = pa.table({"rule": pc.list_flatten(lists),
                           "status": table["status"].combine_chunks().take(
                               pc.list_parent_indices(lists))})
        if not missed.num_rows:
            return
        for entry in missed.group_by(["rule", "status"]).aggregate([([], "count_all")]).to_pylist():
            rule = entry["rule"]
            if rule not in self.rule_misses and len(self.rule_misses) >= MAX_RULES:
                rule = "(other rules)"
            self.rule_misses.setdefault(rule, Counter())[entry["status"]] += entry["count_all"]

    def sample(self) -> list[dict]:
        """The gallery's rows, in input order."""
        return sorted(self._sample.rows(), key=lambda r: (r["row_index"], r["occurrence"]))

    def shown_scores(self) -> list[Distribution]:
        """The score columns with at least one value, in page order."""
        return [d for d in self.scores.values() if d.count]


def _value_counts(array) -> tuple[list, list]:
    counts = pc.value_counts(array)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _column(table: pa.Table, name: str) -> np.ndarray | None:
    """A score column as floats (NaN where missing), or None where the table lacks it."""
    if name not in table.column_names:
        return None
    try:
        column = pc.cast(table[name], pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pc.fill_null(column, math.nan).to_numpy(zero_copy_only=False)


_ROW_COLUMNS = ("id", "row_index", "occurrence", "prompt", "error_code", "error", "video_uri",
                "artifacts", "input_image_uri", "input_image_sha256", "quality_tries",
                "quality_kept_try", *params.NAMES)


def _rows(table: pa.Table, indices: list[int], scores: np.ndarray | None = None) -> list[dict]:
    """The few rows the page shows, with long text cut so that what is kept stays small."""
    if not indices:
        return []
    names = set(table.column_names)
    present = [c for c in _ROW_COLUMNS if c in names]
    rows = table.select(present).take(pa.array(indices, pa.int64())).to_pylist()
    for row, index in zip(rows, indices):
        row["prompt"] = cut(row.get("prompt"), PROMPT_CHARS)
        row["negative_prompt"] = cut(row.get("negative_prompt"), PROMPT_CHARS)
        row["error"] = cut(row.get("error"), ERROR_CHARS)
        row["id"] = cut(row.get("id"), ID_CHARS)
        score = None if scores is None else float(scores[index])
        row["score"] = score if score is not None and math.isfinite(score) else None
        row["media"] = media_links(row)
        row.pop("artifacts", None)
    return rows


_READ = ("status", "committed_at", *SCORE_COLUMNS, "motion_static", "quality_passed",
         "quality_failed_rules", "duplicate_of", *_ROW_COLUMNS)


def gather(output_uri: str, sample_size: int = 48) -> Gathered:
    """Read the committed manifests once, into what the page shows: ``manifest.parquet`` when
    it holds every commit (the report a run writes comes right after it), else shard by shard."""
    gathered = Gathered(sample_size=sample_size)
    if manifest.consolidated_is_current(output_uri):
        present = set(manifest.consolidated_schema(output_uri).names)
        tables = manifest.iter_consolidated(output_uri, [c for c in _READ if c in present])
    else:
        tables = manifest.iter_shards(output_uri, columns=_columns(output_uri))
    for table in tables:
        gathered.add(table)
    return gathered


def _columns(output_uri: str) -> list[str]:
    """The columns the page reads (hashes and input identities are most of a manifest's
    bytes) that any manifest holds; one that predates a column reads it as nulls."""
    sources, _ = manifest.committed(output_uri).sources()
    present = set().union(*(s.columns for s in sources))
    return [c for c in _READ if c in present]
