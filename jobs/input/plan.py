"""Stream the input into planned rows: each with its id, occurrence and what to do with it.

The same pass serves ``reelfarm plan`` (counting only) and ``render`` (resolving every row).
Rows already committed in the output are skipped, which is what makes a rerun a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import JobConfig
from jobs.input.dataset import InputDataset, iter_batches, warn_ignored
from jobs.input.preflight import Preflight, Refusal
from jobs.store.hashset import HashSet, key_hashes, row_hash
from jobs import params
from jobs.input.rows import (NOT_UTF8, RowFailure, content_id, decoded, resolve, variant_id,
                             variant_row)
from rendering.contract import MEDIA_ROLES, Task

INVALID_EXAMPLES = 5  # invalid rows ``reelfarm plan`` shows with their errors, first in input order


@dataclass
class PlannedRow:
    index: int  # ordinal of the row in the input
    id: str
    occurrence: int  # 0 for the first row with this id, n for its n-th repeat
    prompt: str | None
    carry: dict
    outcome: Task | RowFailure | None = None  # None when only counting
    attempts: int = 0  # render attempts spent on it in this run, in its current stage
    results: list = field(default_factory=list)  # a Result per stage it went through
    stages: list = field(default_factory=list)  # per stage: name, status, attempts, seconds
    replaces: dict | None = None  # a repair: the committed row it replaces (as rows_to_redo reads it)
    variation: int | None = None  # a text stage's variations: which one of its input row it is
    source_id: str | None = None  # and that input row's id

    @property
    def hash(self) -> int:
        return row_hash(self.id, self.occurrence)

    @property
    def redo_of(self) -> float | None:
        """A repair: the committed_at of the commit it replaces."""
        return self.replaces["committed_at"] if self.replaces else None


@dataclass
class PlanCounts:
    rows: int = 0
    done: int = 0
    todo: int = 0
    invalid: int = 0
    duplicates: int = 0
    # Of ``invalid``: rows a stage's worker would refuse (``preflight``): error code ->
    # {message: rows}, e.g. invalid_shape of a shape the model cannot render exactly.
    refused: dict[str, dict[str, int]] = field(default_factory=dict)
    invalid_examples: list[tuple[str, str]] = field(default_factory=list)  # (id, error), first few

    def refuse(self, refusal: Refusal, rows: int = 1) -> None:
        reasons = self.refused.setdefault(refusal.code, {})
        reasons[refusal.message] = reasons.get(refusal.message, 0) + rows
        self.invalid += rows

    def refused_rows(self, code: str) -> int:
        return sum(self.refused.get(code, {}).values())

    def example(self, code: str) -> str | None:
        """The message most of the rows refused with ``code`` fail with."""
        reasons = self.refused.get(code)
        return max(reasons, key=reasons.get) if reasons else None

    @property
    def invalid_shape(self) -> int:
        return self.refused_rows("invalid_shape")

    def add_examples(self, examples) -> None:
        """Keep the first ``INVALID_EXAMPLES`` of the (id, error) pairs given, in input order."""
        room = INVALID_EXAMPLES - len(self.invalid_examples)
        self.invalid_examples += [(_shortened(i), e) for i, e in list(examples)[:room]]


def plan_rows(dataset: InputDataset, cfg: JobConfig, committed: HashSet, counts: PlanCounts,
              resolve_rows: bool = True, redo: dict[int, dict] | None = None,
              checks: Preflight | None = None) -> Iterator[PlannedRow]:
    """Yield every input row not yet committed, in input order; ``counts`` is kept up to date.
    ``redo``: committed rows to render again (row hash: the committed row replaced).
    ``checks``: a row a stage's worker would refuse fails here, before any stage renders it."""
    warn_ignored(dataset)
    seen = HashSet()
    repeats: dict[int, int] = {}  # ids seen more than once: first-occurrence hash -> repeats
    index = 0
    has_id = "id" in dataset.columns
    variations = cfg.variations  # rows made of each input row (a text stage's)
    for batch in iter_batches(dataset, cfg.input.batch_rows):
        rows = batch.to_pylist()
        ids, id_errors = zip(*(_row_id(row, has_id) for row in rows)) if rows else ((), ())
        first_hashes = [row_hash(i) for i in ids]
        occurrences = _occurrences(first_hashes, seen.contains(first_hashes), repeats)
        hashes = [h if n == 0 else row_hash(i, n) for h, i, n in zip(first_hashes, ids, occurrences)]
        entries = [(*entry, None, None) for entry in
                   zip(rows, ids, id_errors, occurrences, hashes)]
        if variations > 1:  # each input row is K rows, ids and hashes of their own
            entries = [(row, variant_id(i, k), error, n, row_hash(variant_id(i, k), n), k, i)
                       for row, i, error, n, _, _, _ in entries for k in range(variations)]
        is_done = committed.contains([e[4] for e in entries]) if len(committed) \
            else [False] * len(entries)
        for (row, row_id, id_error, occurrence, h, k, source), done in zip(entries, is_done):
            index += not k  # an input row's first (or only) row
            counts.rows += 1
            if done:
                counts.done += 1
                continue
            planned = PlannedRow((index - 1) * variations + (k or 0), row_id, occurrence,
                                 _text(row.get("prompt")),
                                 {c: row.get(c) for c in cfg.input.carry_columns},
                                 replaces=redo.get(h) if redo else None, variation=k,
                                 source_id=source)
            if resolve_rows:
                planned.outcome = _outcome(row if k is None else variant_row(row, row_id),
                                           planned, id_error, cfg)
                refusal = checks and isinstance(planned.outcome, Task) and \
                    checks.refusal(planned.outcome)
                if refusal:
                    counts.refuse(refusal)
                    planned.outcome = _refused(planned.outcome, refusal)
                elif isinstance(planned.outcome, RowFailure):
                    counts.invalid += 1
                if isinstance(planned.outcome, RowFailure):
                    counts.add_examples([(planned.id, planned.outcome.error)])
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
             cfg: JobConfig) -> Task | RowFailure:
    if id_error:
        return RowFailure(planned.id, "invalid_id", f"invalid_id: {id_error}", {})
    if planned.occurrence:
        return RowFailure(planned.id, "duplicate_id",
                          f"duplicate_id: id {_shortened(planned.id)!r} appears earlier in the input "
                          f"(this is repeat {planned.occurrence})", {})
    return resolve(row, planned.id, cfg)


def _refused(task: Task, refusal: Refusal) -> RowFailure:
    return RowFailure(task.id, refusal.code, refusal.error, {**task.params, "seed": task.seed},
                      refusal.stage)


def _row_id(row: dict, has_id: bool) -> tuple[str, str | None]:
    """The row's id and, when its id column is unusable, why (the content id stands in)."""
    if not has_id:
        return content_id(row), None
    value = decoded(row.get("id"))
    if value is None:
        return content_id(row), "id is null"
    if value is NOT_UTF8:
        return content_id(row), "id is not valid UTF-8"
    return str(value), None


def _shortened(text: str, limit: int = 80) -> str:
    """Enough of an id to recognise it in a message; ids may be arbitrarily long."""
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def count_plan(dataset: InputDataset, cfg: JobConfig, committed: HashSet,
               checks: Preflight | None = None) -> PlanCounts:
    """The counts ``plan_rows`` would reach, in a fraction of its time: for ``reelfarm plan``.

    Given the stages' ``checks``, a row that resolves to a task a stage's worker would refuse
    (a shape its model cannot render exactly, a missing input) counts as invalid too, as
    ``render`` fails it before rendering. Rows with no per-row override or medium all make the
    config's default task: it is checked once.

    Building a row object and resolving it costs ~10 us a row, minutes at 10 million rows. Here
    the common rows are handled a batch at a time (ids and prompts checked by Arrow, hashes
    joined in one buffer); any row the fast checks cannot vouch for (a null, binary or unusual
    id or prompt, a per-row override, a repeated id) is decided by the same code as
    ``plan_rows`` (``_row_id``, ``_occurrences``, ``_outcome``), so the counts are the same.
    With a text stage's ``variations`` (K rows of each input row, ids and seeds of their own),
    the counts are ``plan_rows``'s, every row resolved.
    """
    counts = PlanCounts()
    if cfg.variations > 1:  # rows of their own ids and seeds: each one is resolved
        for _ in plan_rows(dataset, cfg, committed, counts, checks=checks):
            pass
        return counts
    warn_ignored(dataset)
    seen = HashSet()
    repeats: dict[int, int] = {}
    has_id = "id" in dataset.columns
    default = resolve({"prompt": "x"}, "x", cfg)
    defaults_ok = isinstance(default, Task)
    default_refusal = checks.refusal(default) if checks and defaults_ok else None
    for batch in iter_batches(dataset, cfg.input.batch_rows):
        n = batch.num_rows
        if n == 0:
            continue
        # Step 1: ids. Fast: a non-null string or integer id is the id; the rest row by row.
        keys, slow_ids = _fast_id_keys(batch, has_id), {}
        for i, key in enumerate(keys):
            if key is None:
                row_id, error = _row_id(_row(batch, i), has_id)
                slow_ids[i] = (row_id, error)
                keys[i] = row_id.encode("utf-8", "surrogatepass")
        # Step 2: occurrences. Only rows whose id was seen before (here or in an earlier
        # batch) can repeat; they go through _occurrences in input order.
        first_hashes = key_hashes(keys)
        order = np.argsort(first_hashes, kind="stable")  # equal ids stay in input order
        ordered = first_hashes[order]
        later = np.zeros(n, dtype=bool)  # in sorted order: an earlier row of the batch has it
        later[1:] = ordered[1:] == ordered[:-1]
        seen_before = seen.contains(ordered, presorted=True)
        repeated = np.empty(n, dtype=bool)
        repeated[order] = later | seen_before
        hashes = first_hashes.copy()
        repeat_rows = np.flatnonzero(repeated)
        occurrences = dict(zip(repeat_rows.tolist(), _occurrences(
            first_hashes[repeat_rows].tolist(), [True] * len(repeat_rows), repeats)))
        for i, occurrence in occurrences.items():
            hashes[i] = row_hash(keys[i].decode("utf-8", "surrogatepass"), occurrence)
        # Step 3: committed rows are done; every other row is to do.
        done = committed.contains(hashes) if len(committed) else np.zeros(n, dtype=bool)
        todo = ~done
        counts.rows += n
        counts.done += int(done.sum())
        counts.todo += int(todo.sum())
        counts.duplicates += int((repeated & todo).sum())
        # Step 4: invalid rows: bad ids and repeats fail without resolving; of the others,
        # only those the fast checks cannot vouch for are resolved one by one.
        plain = todo & ~repeated
        if slow_ids:
            plain[list(slow_ids)] = False
        vouched = _vouched_rows(batch, cfg) if defaults_ok else np.zeros(n, dtype=bool)
        counts.invalid += int((todo & repeated).sum())
        examples = []  # (row in batch, id, error) of this batch's first invalid rows
        wanted = INVALID_EXAMPLES if len(counts.invalid_examples) < INVALID_EXAMPLES else 0
        for i in np.flatnonzero(todo & repeated)[:wanted].tolist():
            row_id, error = slow_ids.get(i) or (keys[i].decode("utf-8"), None)
            outcome = _outcome({}, PlannedRow(i, row_id, occurrences[i], None, {}), error, cfg)
            examples.append((i, row_id, outcome.error))
        # Vouched rows make the default task.
        if default_refusal and (vouched_rows := int((plain & vouched).sum())):
            counts.refuse(default_refusal, vouched_rows)
            examples += [(i, keys[i].decode("utf-8"), default_refusal.error)
                         for i in np.flatnonzero(plain & vouched)[:wanted].tolist()]
        resolved_examples = []  # rows come in input order here: the first few are enough
        for i in np.flatnonzero(todo & ~repeated & ~(plain & vouched)).tolist():
            row = _row(batch, i)
            row_id, error = slow_ids.get(i) or (keys[i].decode("utf-8"), None)
            planned = PlannedRow(i, row_id, 0, None, {})
            outcome = _outcome(row, planned, error, cfg)
            refusal = checks and isinstance(outcome, Task) and checks.refusal(outcome)
            if refusal:
                counts.refuse(refusal)
                failure = refusal.error
            elif isinstance(outcome, RowFailure):
                counts.invalid += 1
                failure = outcome.error
            else:
                failure = None
            if failure and len(resolved_examples) < wanted:
                resolved_examples.append((i, row_id, failure))
        counts.add_examples((row_id, error) for _, row_id, error
                            in sorted(examples + resolved_examples))
        seen.add(ordered[~later & ~seen_before], checked=True)
    return counts


def _row(batch: pa.RecordBatch, i: int) -> dict:
    return batch.slice(i, 1).to_pylist()[0]


def _fast_id_keys(batch: pa.RecordBatch, has_id: bool) -> list[bytes | None]:
    """Each row's id as UTF-8 bytes where ``_row_id`` would return its value as it is: a
    non-null string, or an integer (``str`` of it); None where ``_row_id`` must decide."""
    if not has_id:
        return [None] * batch.num_rows
    column = batch.column("id")
    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return [None] * batch.num_rows
    return pc.cast(column, pa.large_binary()).to_pylist()


# Every row ``resolve`` rejects for its id or prompt must fail these checks too (rows that fail
# them are resolved exactly, so the checks may be stricter than ``resolve``, never looser).
# An id passes when it is printable ASCII without spaces (no control characters either); a
# prompt when it holds a letter, digit or ASCII punctuation (so it is not blank, whatever
# ``str.strip`` counts as space).
_PLAIN_ID = r"^[!-~]+$"
_PROMPT_HAS_TEXT = r"[!-~\p{L}\p{N}]"


def _vouched_rows(batch: pa.RecordBatch, cfg: JobConfig) -> np.ndarray:
    """Rows that certainly resolve to a render task (given a non-repeated, fast-path id)."""
    n = batch.num_rows
    names = batch.schema.names
    prompt = batch.column("prompt")
    if not (pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type)):
        return np.zeros(n, dtype=bool)
    limits = cfg.limits
    try:
        ok = _all_true(pc.match_substring_regex(prompt, _PROMPT_HAS_TEXT))
        ok &= _all_true(pc.less_equal(pc.utf8_length(prompt), limits.max_prompt_chars))
        if "id" in names:
            ids = batch.column("id")
            if not pa.types.is_integer(ids.type):
                ok &= _all_true(pc.match_substring_regex(ids, _PLAIN_ID))
                ok &= _all_true(pc.less_equal(pc.utf8_length(ids), limits.max_id_chars))
            elif limits.max_id_chars < 20:  # the longest int64 is 20 characters
                ok &= _all_true(pc.less_equal(pc.utf8_length(pc.cast(ids, pa.string())),
                                              limits.max_id_chars))
        # A per-row override or medium takes the row off the fast path: it must be checked.
        for name in (*params.NAMES, *MEDIA_ROLES):
            if name in names:
                ok &= _all_true(pc.is_null(batch.column(name)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. invalid UTF-8: resolve them all
        return np.zeros(n, dtype=bool)
    return ok


def _all_true(mask: pa.Array) -> np.ndarray:
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
