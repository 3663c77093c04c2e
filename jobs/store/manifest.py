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
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.store import layout
from jobs import params
from jobs.store.hashset import HashSet, row_hashes
from jobs.store.parquet_files import parquet_bytes, read_parquet
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
    # Written into manifest.parquet by `reelfarm dedup` (null in shards): the id of an earlier
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


def write_shard(output_uri: str, records: list[dict]) -> str:
    """Commit a shard: write its manifest in one atomic write. Returns the manifest's path."""
    fs, root = storage.filesystem(output_uri)
    path = storage.join(root, layout.MANIFESTS_DIR, shard_name(records))
    storage.write_bytes(fs, path, parquet_bytes(to_table(records)))
    return path


def shard_paths(output_uri: str) -> list[str]:
    fs, root = storage.filesystem(output_uri)
    directory = storage.join(root, layout.MANIFESTS_DIR)
    fs.invalidate_cache(directory)  # workers and other drivers write here too
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.ls(directory, detail=False)
                  if p.rsplit("/", 1)[-1].startswith(layout.SHARD_PREFIX) and p.endswith(".parquet"))


def committed_hashes(output_uri: str, redo: dict[int, float] | None = None) -> HashSet:
    """The rows every committed shard holds, as row hashes, less those to ``redo``."""
    fs, _ = storage.filesystem(output_uri)
    committed = HashSet()
    for path in shard_paths(output_uri):
        hashes = row_hashes(read_parquet(fs, path, columns=["id", "occurrence"])).tolist()
        committed.add([h for h in hashes if h not in redo] if redo else hashes)
    return committed


@dataclass
class Tally:
    """Counts over committed rows, gathered one shard at a time."""

    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error_code -> failed rows
    examples: dict = field(default_factory=dict)  # error_code -> its first error message
    by_stage: dict = field(default_factory=dict)  # stage -> Counter of what it did with rows
    kept_below: Counter = field(default_factory=Counter)  # tries -> ok rows kept under the gate

    @property
    def ok(self) -> int:
        return self.by_status.get("ok", 0)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.by_status.update(table["status"].to_pylist())
        if "stages" in table.column_names:
            for stages in table["stages"].to_pylist():
                for stage in stages or ():
                    self.by_stage.setdefault(stage["name"], Counter())[stage["status"]] += 1
        failed = table.filter(pc.equal(table["status"], "failed"))
        for code, error in zip(failed["error_code"].to_pylist(), failed["error"].to_pylist()):
            self.errors[code] += 1
            self.examples.setdefault(code, error)
        self.add_gate(table)

    def add_gate(self, table: pa.Table) -> pa.Table | None:
        """Count the ok rows the quality gate kept below ``quality.min_score`` (they pass as ok,
        so only this makes them visible), by their tries, and return them. None: the rows
        predate the gate's columns."""
        if "quality_passed" not in table.column_names:
            return None
        kept = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                    pc.equal(table["quality_passed"], False)))
        self.kept_below.update(len(tries) for tries in kept["quality_tries"].to_pylist())
        return kept

    def gate_counts(self) -> dict:
        """The gate's counts as ``job.json`` keeps them."""
        by_tries = {str(tries): rows for tries, rows in sorted(self.kept_below.items())}
        return {"kept_below_min_score": sum(self.kept_below.values()),
                "kept_below_min_score_tries": by_tries}

    def top_errors(self, limit: int = 5) -> list[tuple[str, int, str]]:
        return [(code, n, self.examples[code]) for code, n in self.errors.most_common(limit)]


def iter_shards(output_uri: str, columns: list[str] | None = None,
                current: bool = True) -> Iterator[pa.Table]:
    """Committed rows one shard at a time, in input order (memory: one shard). ``current``:
    without the commits a repair replaced."""
    fs, _ = storage.filesystem(output_uri)
    footers, _ = _footers(fs, shard_paths(output_uri))
    yield from _read_shards(fs, footers, columns, current)


def _read_shards(fs, footers: list[_Footer], columns: list[str] | None,
                 current: bool) -> Iterator[pa.Table]:
    """``iter_shards`` over footers already read."""
    replaced = _superseded(fs, footers) if current else set()
    keys = ["id", "occurrence", "committed_at", "row_index"]
    for footer in footers:
        wanted = None if columns is None else list(dict.fromkeys([*columns, *keys]))
        # A shard written before a column existed reads it as nulls.
        table = read_parquet(fs, footer.path, wanted and [c for c in wanted if c in footer.columns])
        for name in wanted or ():
            if name not in footer.columns:
                table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows,
                                                                         SCHEMA.field(name).type))
        if replaced:
            keep = [(h, t) not in replaced
                    for h, t in zip(row_hashes(table).tolist(), table["committed_at"].to_pylist())]
            table = table.filter(pa.array(keep, pa.bool_()))
        table = table.sort_by([("row_index", "ascending"), ("occurrence", "ascending")])
        yield table if columns is None else table.select(columns)


def tally(output_uri: str) -> Tally:
    counts = Tally()
    for table in current_rows(output_uri, ["row_index", "occurrence", "status", "error_code",
                                           "error", "stages", "quality_passed", "quality_tries"]):
        counts.add(table)
    return counts


def consolidate(output_uri: str) -> Tally:
    """Write ``manifest.parquet`` from the shard manifests, streaming, and count its rows. Each
    shard's footer is read once; rows are written in row groups of ``ROW_GROUP_ROWS``, so the
    file's footer stays small however many shards made it."""
    fs, root = storage.filesystem(output_uri)
    footers, schema = _footers(fs, shard_paths(output_uri), SCHEMA)
    counts = Tally()
    with tempfile.TemporaryDirectory(prefix="reelfarm-manifest-") as tmp:
        local = os.path.join(tmp, layout.MANIFEST_FILE)
        with pq.ParquetWriter(local, schema) as writer:
            pending: list[pa.Table] = []
            for table in _read_shards(fs, footers, None, current=True):
                counts.add(table)
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
    """``manifest.parquet`` was written after every shard manifest now committed (one listing of
    ``manifests/``, and the file's own stamp): it holds every current commit. A stamp that
    cannot be read, or a tie, says no: reading the shards is slower, never wrong."""
    fs, root = storage.filesystem(output_uri)
    directory = storage.join(root, layout.MANIFESTS_DIR)
    consolidated = storage.join(root, layout.MANIFEST_FILE)
    for path in (directory, consolidated):  # (and their parents) as they are now, not as cached
        fs.invalidate_cache(path)
    try:
        made = _modified(fs.info(consolidated))
        shards = [o for o in fs.ls(directory, detail=True)
                  if o["name"].rsplit("/", 1)[-1].startswith(layout.SHARD_PREFIX)]
    except FileNotFoundError:
        return False
    stamps = [_modified(o) for o in shards]
    return made is not None and None not in stamps and all(stamp < made for stamp in stamps)


def _modified(info: dict) -> float | None:
    """An object's modification time in seconds: ``mtime`` on local disk, ``LastModified`` on
    object stores; None when the filesystem gives neither."""
    stamp = info.get("mtime", info.get("LastModified"))
    if hasattr(stamp, "timestamp"):
        return stamp.timestamp()
    return float(stamp) if isinstance(stamp, (int, float)) else None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema``, in its order: a column a shard lacks is null."""
    if table.schema == schema:
        return table
    columns = [table[f.name].cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class _Footer:
    path: str
    first_row: int  # the shard's smallest row_index: shards are read in input order
    repairs: bool  # its redo_of column holds a value: some row in it replaces an earlier commit
    columns: frozenset  # its top-level columns


def _footers(fs, paths: list[str],
             schema: pa.Schema | None = None) -> tuple[list[_Footer], pa.Schema | None]:
    """What each shard's footer statistics say, one footer read per shard, no data read; and
    given a ``schema``, its union with every shard's (a shard's schema is not kept: holding
    thousands of them slows reading the shards by half)."""
    found = []
    for path in paths:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        starts = [stats for stats, _ in _stats(meta, "row_index")]
        first_row = min((s.min for s in starts if s is not None and s.has_min_max), default=0)
        repairs = any(stats is None or not stats.has_null_count or stats.null_count < rows
                      for stats, rows in _stats(meta, "redo_of"))
        shard_schema = meta.schema.to_arrow_schema()
        if schema is not None and not shard_schema.equals(schema):
            schema = pa.unify_schemas([schema, shard_schema], promote_options="permissive")
        found.append(_Footer(path, first_row, repairs, frozenset(shard_schema.names)))
    return sorted(found, key=lambda footer: footer.first_row), schema


def _stats(meta: pq.FileMetaData, column: str) -> list[tuple]:
    """(statistics, rows) of each row group's chunk of a top-level ``column`` (none if absent).
    Nested columns take several chunks, so the chunk is found by its path, not the field index."""
    index = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == column), None)
    if index is None:
        return []
    return [(meta.row_group(g).column(index).statistics, meta.row_group(g).num_rows)
            for g in range(meta.num_row_groups)]


def _superseded(fs, footers: list[_Footer]) -> set[tuple[int, float]]:
    """(row hash, committed_at) of every commit a repair replaced (few: one per redone row),
    read only from the shards whose footer says they hold repairs."""
    replaced = set()
    for footer in footers:
        if footer.repairs:
            table = read_parquet(fs, footer.path, columns=["id", "occurrence", "redo_of"])
            table = table.filter(pc.is_valid(table["redo_of"]))
            replaced.update(zip(row_hashes(table).tolist(), table["redo_of"].to_pylist()))
    return replaced

