"""Stream the input into planned rows: each with its id, occurrence and what to do with it.

The same pass serves ``reelfarm plan`` (counting only) and ``render`` (resolving every row).
Rows already committed in the output are skipped, which is what makes a rerun a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from jobs.config import JobConfig
from jobs.dataset import InputDataset, iter_batches
from jobs.hashset import HashSet, row_hash
from jobs.rows import RowFailure, content_id, resolve
from rendering.specs import RenderTask


@dataclass
class PlannedRow:
    index: int  # ordinal of the row in the input
    id: str
    occurrence: int  # 0 for the first row with this id, n for its n-th repeat
    prompt: str | None
    carry: dict
    outcome: RenderTask | RowFailure | None = None  # None when only counting
    attempts: int = 0  # render attempts spent on it in this run

    @property
    def hash(self) -> int:
        return row_hash(self.id, self.occurrence)


@dataclass
class PlanCounts:
    rows: int = 0
    done: int = 0
    todo: int = 0
    invalid: int = 0
    duplicates: int = 0


def plan_rows(dataset: InputDataset, cfg: JobConfig, committed: HashSet, counts: PlanCounts,
              resolve_rows: bool = True) -> Iterator[PlannedRow]:
    """Yield every input row not yet committed, in input order; ``counts`` is kept up to date."""
    seen = HashSet()
    repeats: dict[int, int] = {}  # ids seen more than once: first-occurrence hash -> repeats
    index = 0
    has_id = "id" in dataset.columns
    for batch in iter_batches(dataset, cfg.input.batch_rows):
        rows = batch.to_pylist()
        ids, id_errors = zip(*(_row_id(row, has_id) for row in rows)) if rows else ((), ())
        first_hashes = [row_hash(i) for i in ids]
        occurrences = _occurrences(first_hashes, seen.contains(first_hashes), repeats)
        hashes = [h if n == 0 else row_hash(i, n) for h, i, n in zip(first_hashes, ids, occurrences)]
        is_done = committed.contains(hashes) if len(committed) else [False] * len(rows)
        for row, row_id, id_error, occurrence, done in zip(rows, ids, id_errors, occurrences, is_done):
            index += 1
            counts.rows += 1
            if done:
                counts.done += 1
                continue
            planned = PlannedRow(index - 1, row_id, occurrence, _text(row.get("prompt")),
                                 {c: row.get(c) for c in cfg.input.carry_columns})
            if resolve_rows:
                planned.outcome = _outcome(row, planned, id_error, cfg)
                counts.invalid += isinstance(planned.outcome, RowFailure)
            counts.duplicates += occurrence > 0
            counts.todo += 1
            yield planned
        seen.add(first_hashes)


def _occurrences(first_hashes: list[int], seen_before: list[bool], repeats: dict[int, int]) -> list[int]:
    """How many earlier rows carry the same id, for each row of a batch.

    ``repeats`` remembers only ids that did repeat; a first occurrence is known from ``seen``.
    """
    in_batch: set[int] = set()
    out = []
    for h, before in zip(first_hashes, seen_before):
        if before or h in in_batch:
            repeats[h] = repeats.get(h, 0) + 1
            out.append(repeats[h])
        else:
            in_batch.add(h)
            out.append(0)
    return out


def _outcome(row: dict, planned: PlannedRow, id_error: str | None,
             cfg: JobConfig) -> RenderTask | RowFailure:
    if id_error:
        return RowFailure(planned.id, "invalid_id", f"invalid_id: {id_error}", {})
    if planned.occurrence:
        return RowFailure(planned.id, "duplicate_id",
                          f"duplicate_id: id {planned.id!r} appears earlier in the input "
                          f"(this is repeat {planned.occurrence})", {})
    return resolve(row, planned.id, cfg)


def _row_id(row: dict, has_id: bool) -> tuple[str, str | None]:
    """The row's id and, when its id column is unusable, why (the content id stands in)."""
    if not has_id:
        return content_id(row), None
    value = row.get("id")
    if value is None:
        return content_id(row), "id is null"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return content_id(row), "id is not valid UTF-8"
    return str(value), None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
