"""Manifests: the single source of truth of an output.

A shard is committed when its manifest exists; its videos were made durable before it was
written. The consolidated ``manifest.parquet`` is derived from the shard manifests at the end
of a job, one row per input row in input order.

A row is committed once, unless a repair (``render --redo``) renders it again: the new commit
names the one it replaces in ``redo_of`` (that commit's ``committed_at``). The replaced commit
stays in its shard manifest as history; everything that reads the output's current state
(``manifest.parquet``, counts, ``verify``) skips it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.store import layout, segments
from jobs import params
from jobs.store.duplicates import Marks
from jobs.store.hashset import HashSet, row_hashes
from jobs.store.tally import Tally
from jobs.store.fetched import fetch, stamp
from jobs.store.parquet_files import decode_parquet, parquet_bytes
from rendering import storage
from rendering.contract import MEDIA_ROLES

# ``kind`` (video, image, preview: what a next stage takes it as) is null in shards written
# before artifacts recorded it.
ARTIFACT = pa.struct([("name", pa.string()), ("path", pa.string()), ("bytes", pa.int64()),
                      ("sha256", pa.string()), ("kind", pa.string())])
# What each stage did with a row, in order (a single-stage job has one: "video").
# ``height`` and ``width``: the size the stage rendered at (an earlier stage may have its own);
# null in shards written before stages recorded it.
# ``node_id`` and ``gpu_ids``: the Ray node and the GPUs of the worker that rendered it (a bad
# GPU or node is found from the manifest); null when recovered or refused, and in older shards.
STAGE = pa.struct([("name", pa.string()), ("status", pa.string()), ("attempts", pa.int32()),
                   ("seconds", pa.float64()), ("height", pa.int32()), ("width", pa.int32()),
                   ("node_id", pa.string()), ("gpu_ids", pa.list_(pa.string()))])
# Each conditioning input's identity: where it was read from, and the hash of what was read.
# Prefixed, so an input video never collides with the output's own video columns.
INPUT_COLUMNS = [(f"input_{role}_{what}", pa.string()) for role in MEDIA_ROLES
                 for what in ("uri", "sha256")]
# What a row's task is made of: a committed row's values that say which task it answered.
TASK_COLUMNS = ["id", "prompt", *params.NAMES, *(name for name, _ in INPUT_COLUMNS)]
# What a worker measured of a row (Result.metrics), one column each; null when not measured.
METRIC_COLUMNS = [
    ("prompt_truncated", pa.bool_()),  # the text encoder read only the prompt's first tokens
    # A text stage's rewrite: the prompt the later stages rendered (the row's own after a
    # fallback), the model that wrote it (path@revision), the sha256 of its system prompt, why
    # it fell back (empty, too_long, not_text; null: the rewrite was used), and whether it came
    # from the cache. All null without a text stage.
    ("rewritten_prompt", pa.string()),
    ("rewrite_model", pa.string()),
    ("rewrite_system_prompt_sha256", pa.string()),
    ("rewrite_fallback", pa.string()),
    ("rewrite_cache_hit", pa.bool_()),
    ("clip_scores", pa.list_(pa.float64())),  # per frame: max(100 * cos(image, text), 0)
    ("clip_score", pa.float64()),  # their mean
    ("clip_score_min", pa.float64()),
    ("clip_worst_frame", pa.int32()),
    ("clip_temporal_consistency", pa.float64()),  # mean cos of consecutive frames' embeddings
    ("clip_drift_frames", pa.int32()),  # frames under quality.drift_threshold
    # The normalized mean of the frames' unit CLIP image embeddings (rendering.scoring), float16,
    # of the CLIP model's projection size: a list, since that size is the model's.
    ("clip_embedding", pa.list_(pa.float16())),
    ("aesthetic_score", pa.float64()),  # the aesthetic head on first, middle, last frame (mean)
    ("motion_score", pa.float64()),  # mean optical flow, pixels per frame at 128 px
    ("motion_static_share", pa.float64()),  # share of frame pairs under quality.static_threshold
    ("motion_static", pa.bool_()),  # motion_score is under quality.static_threshold
    ("quality_passed", pa.bool_()),  # the kept try meets every quality rule (min_score included)
    ("quality_failed_rules", pa.list_(pa.string())),  # the rules it misses, as "column >= min"
    ("quality_tries", pa.list_(pa.struct([("seed", pa.int64()), ("clip_score", pa.float64())]))),
    ("quality_kept_try", pa.int32()),  # the index in quality_tries of the video kept
    # The pipeline's safety checker flagged (and blacked out) a picture the row kept, in any
    # stage; null: no stage of the row has a checker.
    ("safety_flagged", pa.bool_()),
    ("safety_retries", pa.int32()),  # renders made again, with new seeds, for a flagged picture
]
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row_index", pa.int64()),
    ("occurrence", pa.int32()),
    ("source_id", pa.string()),  # a text stage's variations: the input row's id (else null)
    ("variation", pa.int32()),  # and which of its variations this row is, from 0
    ("prompt", pa.string()),
    ("status", pa.string()),
    ("error_code", pa.string()),
    ("error", pa.string()),
    # The "video" artifact's, for readers that want just that. Like every artifact path it is
    # relative to the output root: a copied or synced output verifies against its own objects.
    ("video_uri", pa.string()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    *((p.name, p.arrow) for p in params.PARAMS),
    *INPUT_COLUMNS,
    ("artifacts", pa.list_(ARTIFACT)),  # every object the row stored, every stage's
    ("stages", pa.list_(STAGE)),
    ("failed_stage", pa.string()),  # the stage that failed the row (null: ok, or invalid input)
    *METRIC_COLUMNS,
    ("attempts", pa.int32()),
    ("render_s", pa.float64()),
    ("committed_at", pa.float64()),
    ("redo_of", pa.float64()),  # the committed_at of the commit this repair replaces
    # In manifest.parquet only (null in shards), from duplicates.parquet: the id of an earlier
    # ok row whose clip_embedding is this close, and their cosine similarity.
    ("duplicate_of", pa.string()),
    ("duplicate_similarity", pa.float64()),
])


def to_table(records: list[dict]) -> pa.Table:
    committed_at = time.time()
    base = {name: [r.get(name) for r in records] for name in SCHEMA.names}
    base["committed_at"] = [committed_at] * len(records)
    table = pa.table(base, schema=SCHEMA)
    for name in sorted({k for r in records for k in r if k.startswith("carry.")}):
        table = table.append_column(name[len("carry."):], pa.array([r.get(name) for r in records]))
    return table


def shard_name(records: list[dict]) -> str:
    """A name fixed by the rows the shard holds, so committing the same rows twice is harmless."""
    keys = sorted(f"{r['id']}\x00{r['occurrence']}" for r in records)
    digest = hashlib.sha256("\x01".join(keys).encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"{layout.SHARD_PREFIX}{digest}.parquet"


def write_shard(output_uri: str, records: list[dict]) -> tuple[str, pa.Table]:
    """Commit a shard: write its manifest in one atomic write. Returns its path and rows."""
    fs, root = storage.filesystem(output_uri)
    path = storage.join(root, layout.MANIFESTS_DIR, shard_name(records))
    table = to_table(records)
    storage.write_bytes(fs, path, parquet_bytes(table))
    return path, table


def committed(output_uri: str) -> segments.Committed:
    """``manifests/`` listed once: what the readers below read."""
    fs, root = storage.filesystem(output_uri)
    return segments.read_committed(fs, root)


def committed_hashes(output_uri: str, redo: dict[int, float] | None = None) -> HashSet:
    """The rows every committed manifest holds, as row hashes, less those to ``redo``."""
    listed = committed(output_uri)
    sources, _ = listed.sources()
    hashes = HashSet()
    reads = [(s, ["id", "occurrence"]) for s in sources]
    for table in segments.read_in_order(listed.fs, reads):
        found = row_hashes(table).tolist()
        hashes.add([h for h in found if h not in redo] if redo else found)
    return hashes


def iter_shards(output_uri: str, columns: list[str] | None = None,
                current: bool = True) -> Iterator[pa.Table]:
    """Committed rows in input order, a table at a time (memory: the manifests whose rows
    overlap, read a few at once). ``current``: without the commits a repair replaced."""
    listed = committed(output_uri)
    sources, _ = listed.sources()
    yield from _read_sources(listed.fs, sources, columns, current)


def _read_sources(fs, sources: list[segments.Source], columns: list[str] | None,
                  current: bool) -> Iterator[pa.Table]:
    """``iter_shards`` over sources already found: each is read (on threads, ahead), and its
    rows held until no source yet to come can hold an earlier row."""
    replaced = _superseded(fs, sources) if current else set()
    keys = ["id", "occurrence", "committed_at", "row_index"]
    wanted = None if columns is None else list(dict.fromkeys([*columns, *keys]))
    held: pa.Table | None = None
    tables = segments.read_in_order(fs, [(s, wanted and [c for c in wanted if c in s.columns])
                                         for s in sources])
    for i, (source, table) in enumerate(zip(sources, tables)):
        table = _with_nulls(table, wanted or ())  # a column a manifest predates reads as nulls
        if replaced:
            keep = [(h, t) not in replaced
                    for h, t in zip(row_hashes(table).tolist(), table["committed_at"].to_pylist())]
            table = table.filter(pa.array(keep, pa.bool_()))
        held = table if held is None else pa.concat_tables([held, table],
                                                           promote_options="permissive")
        limit = sources[i + 1].first_row if i + 1 < len(sources) else None
        ready = held if limit is None else held.filter(pc.less(held["row_index"], limit))
        held = None if limit is None else held.filter(pc.greater_equal(held["row_index"], limit))
        if ready.num_rows:
            ready = ready.sort_by([("row_index", "ascending"), ("occurrence", "ascending")])
            yield ready if columns is None else ready.select(columns)


def _with_nulls(table: pa.Table, names) -> pa.Table:
    for name in names:
        if name not in table.column_names:
            spec = SCHEMA.field(name)
            table = table.append_column(spec, pa.nulls(table.num_rows, spec.type))
    return table


_TALLIED = ["row_index", "occurrence", "status", "error_code", "error", "stages",
            "quality_passed", "quality_tries"]


def tally(output_uri: str) -> Tally:
    """Counts over the current commits: from ``manifest.parquet`` when it holds them all; else
    the checkpoint's counts of what is folded plus the shards committed since, unless a
    repair's replaced commit would be counted twice; else every manifest."""
    counts = Tally()
    if consolidated_is_current(output_uri):
        tables = iter_consolidated(output_uri, _TALLIED)
    else:
        listed = committed(output_uri)
        folded = (listed.checkpoint or {}).get("tally")
        shards, _ = listed.shard_sources()
        if folded is not None and not any(s.repairs for s in shards):
            counts = Tally.from_json(folded)
            tables = _read_sources(listed.fs, shards, _TALLIED, current=False)
        else:
            tables = iter_shards(output_uri, _TALLIED)
    for table in tables:
        counts.add(table)
    return counts


def consolidate(output_uri: str) -> Tally:
    """Write ``manifest.parquet`` from the shard manifests, streaming, and count its rows. Each
    shard's footer is read once; rows are written in row groups of ``ROW_GROUP_ROWS``, so the
    file's footer stays small however many shards made it. ``duplicate_of`` and
    ``duplicate_similarity`` come from ``duplicates.parquet``, where its entries still hold."""
    fs, root = storage.filesystem(output_uri)
    sources, schema = segments.read_committed(fs, root).sources(SCHEMA)
    marks = Marks.read(output_uri)
    counts = Tally()
    with tempfile.TemporaryDirectory(prefix="reelfarm-manifest-") as tmp:
        local = os.path.join(tmp, layout.MANIFEST_FILE)
        with pq.ParquetWriter(local, schema) as writer:
            pending: list[pa.Table] = []
            for table in _read_sources(fs, sources, None, current=True):
                counts.add(table)
                if marks is not None:
                    table = marks.mark(table)
                pending.append(_conform(table, schema))
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
        storage.upload_file(local, fs, storage.join(root, layout.MANIFEST_FILE))
    return counts


ROW_GROUP_ROWS = 65536  # manifest.parquet's row groups: a footer of KBs at ten million rows


def iter_consolidated(output_uri: str, columns: list[str],
                      batch_rows: int = 65536) -> Iterator[pa.Table]:
    """``manifest.parquet`` a batch at a time: one object to read, where the shards are many.
    A column it was written without (by an older reelfarm) reads as nulls."""
    fs, root = storage.filesystem(output_uri)
    with fs.open(storage.join(root, layout.MANIFEST_FILE), "rb") as f:
        reader = pq.ParquetFile(f)
        present = set(reader.schema_arrow.names)
        for batch in reader.iter_batches(batch_size=batch_rows, use_threads=False,
                                         columns=[c for c in columns if c in present]):
            table = pa.Table.from_batches([batch])
            for name in columns:
                if name not in present:
                    table = table.append_column(SCHEMA.field(name),
                                                pa.nulls(table.num_rows, SCHEMA.field(name).type))
            yield table.select(columns)


def consolidated_schema(output_uri: str) -> pa.Schema:
    fs, root = storage.filesystem(output_uri)
    with fs.open(storage.join(root, layout.MANIFEST_FILE), "rb") as f:
        return pq.read_schema(f)


def current_rows(output_uri: str, columns: list[str]) -> Iterator[pa.Table]:
    """Every current commit's ``columns``: from ``manifest.parquet`` when it holds them all (one
    object), else shard by shard. For what reads them all (status, the report), not verify,
    which checks the commits themselves."""
    if consolidated_is_current(output_uri):
        yield from iter_consolidated(output_uri, columns)
    else:
        yield from iter_shards(output_uri, columns=columns)


def consolidated_is_current(output_uri: str) -> bool:
    """``manifest.parquet`` was written after every manifest now committed (one listing of
    ``manifests/``, and the file's own stamp): it holds every current commit. A stamp that
    cannot be read, or a tie, says no: reading the manifests is slower, never wrong."""
    fs, root = storage.filesystem(output_uri)
    consolidated = storage.join(root, layout.MANIFEST_FILE)
    fs.invalidate_cache(consolidated)  # (and its parents) as they are now, not as cached
    try:
        made = stamp(fs.info(consolidated))
    except FileNotFoundError:
        return False
    stamps = segments.read_committed(fs, root).stamps()
    return made is not None and bool(stamps) and None not in stamps and max(stamps) < made


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema``, in its order: a column a shard lacks is null."""
    if table.schema == schema:
        return table
    columns = [table[f.name].cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _superseded(fs, sources: list[segments.Source]) -> set[tuple[int, float]]:
    """(row hash, committed_at) of every commit a repair replaced (few: one per redone row),
    read only from the manifests said to hold repairs."""
    replaced = set()
    for source in sources:
        if source.repairs:
            table = decode_parquet(fetch(fs, source.path, source.info),
                                   columns=["id", "occurrence", "redo_of"])
            table = table.filter(pc.is_valid(table["redo_of"]))
            replaced.update(zip(row_hashes(table).tolist(), table["redo_of"].to_pylist()))
    return replaced

