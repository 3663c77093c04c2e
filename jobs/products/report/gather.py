"""What the report shows, gathered from the committed manifests a shard at a time.

Bounded at any size: what is kept is fixed in size. The gallery is a deterministic sample (the
ok rows whose ``row_hash`` is smallest, so the same output always shows the same videos), the
lowest scores are kept in a heap, histograms widen their bins as the range grows, and prompts
and errors are cut to a few hundred characters.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import params
from jobs.products.report.bins import Bins, score_widths, time_widths
from jobs.products.report.media import media_links
from jobs.products.report.text import ERROR_CHARS, ID_CHARS, PROMPT_CHARS, cut
from jobs.store import manifest
from jobs.store.hashset import row_hashes

SCORE_COLUMN = "clip_score"
LOWEST_ROWS = 12  # lowest-scoring rows listed
KEPT_ROWS = 100  # rows kept below quality.min_score listed (all are counted)
ERROR_EXAMPLES = 3  # example rows shown per error code
MAX_ERROR_CODES = 50  # codes kept apart; more are counted together (codes are a small vocabulary)
# Histograms keep at most this many bins: past it, bins widen to the next width (an exact
# multiple of the last, so merged counts stay exact).
TIME_BINS = 120
SCORE_BINS = 50


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
    scores: Bins = field(default_factory=lambda: Bins(score_widths(), SCORE_BINS))
    scored: int = 0
    score_sum: float = 0.0
    score_min: float = math.inf
    score_max: float = -math.inf
    gate: manifest.Tally = field(default_factory=manifest.Tally)  # its kept_below counts only
    kept: list = field(default_factory=list)  # the first KEPT_ROWS rows kept below the gate
    _sample: list = field(default_factory=list)  # max-heap of (-hash, seq, row)
    _lowest: list = field(default_factory=list)  # max-heap of (-score, -hash, seq, row)
    _seq: itertools.count = field(default_factory=itertools.count)

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
        ok = table.filter(pc.fill_null(pc.equal(status, "ok"), False))
        self.ok += ok.num_rows
        if ok.num_rows == 0:
            return
        self.throughput.add(ok["committed_at"].to_numpy(zero_copy_only=False))
        self._add_kept(self.gate.add_gate(ok))
        scores = _scores(ok)
        hashes = row_hashes(ok)
        self._add_sample(ok, hashes, scores)
        if scores is not None:
            self._add_scores(ok, hashes, scores)

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
        self.kept += _rows(head, list(range(head.num_rows)), _scores(head))

    def _add_sample(self, ok: pa.Table, hashes: np.ndarray, scores: np.ndarray | None) -> None:
        if self.sample_size <= 0:
            return
        candidates = np.arange(len(hashes))
        if len(self._sample) >= self.sample_size:  # only rows that beat the current largest
            candidates = candidates[hashes < np.uint64(-self._sample[0][0])]
        candidates = candidates[np.argsort(hashes[candidates], kind="stable")][:self.sample_size]
        for i, row in zip(candidates.tolist(), _rows(ok, candidates.tolist(), scores)):
            entry = (-int(hashes[i]), next(self._seq), row)
            if len(self._sample) < self.sample_size:
                heapq.heappush(self._sample, entry)
            elif entry[0] > self._sample[0][0]:
                heapq.heapreplace(self._sample, entry)

    def _add_scores(self, ok: pa.Table, hashes: np.ndarray, scores: np.ndarray) -> None:
        finite = np.flatnonzero(np.isfinite(scores))
        if len(finite) == 0:
            return
        values = scores[finite]
        self.scores.add(values)
        self.scored += len(values)
        self.score_sum += float(values.sum())
        self.score_min = min(self.score_min, float(values.min()))
        self.score_max = max(self.score_max, float(values.max()))
        # The shard's lowest few by (score, hash) are the only ones that can enter the heap.
        order = np.lexsort((hashes[finite], values))[:LOWEST_ROWS]
        chosen = finite[order]
        for i, row in zip(chosen.tolist(), _rows(ok, chosen.tolist(), scores)):
            entry = (-float(scores[i]), -int(hashes[i]), next(self._seq), row)
            if len(self._lowest) < LOWEST_ROWS:
                heapq.heappush(self._lowest, entry)
            elif entry[:2] > self._lowest[0][:2]:
                heapq.heapreplace(self._lowest, entry)

    def sample(self) -> list[dict]:
        """The gallery's rows, in input order."""
        return sorted((row for _, _, row in self._sample),
                      key=lambda r: (r["row_index"], r["occurrence"]))

    def lowest(self) -> list[dict]:
        """The lowest-scoring rows, lowest first."""
        return [row for *_, row in sorted(self._lowest, key=lambda e: (-e[0], -e[1]))]


def _value_counts(array) -> tuple[list, list]:
    counts = pc.value_counts(array)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _scores(table: pa.Table) -> np.ndarray | None:
    """The rows' scores as floats (NaN where missing), or None without a score column."""
    if SCORE_COLUMN not in table.column_names:
        return None
    try:
        column = pc.cast(table[SCORE_COLUMN], pa.float64())
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


_READ = ("status", "committed_at", SCORE_COLUMN, "quality_passed", *_ROW_COLUMNS)


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
