"""Segments: committed shard manifests folded into few large ones, behind a checkpoint.

A shard stays the unit of scheduling and of commit (its manifest appears, atomically). Once
enough shards are committed, the driver that holds the lease folds them into one segment:

1. it writes ``segment-<generation>-<token>.parquet`` (their rows, in input order; the token
   is the fold's own);
2. it creates ``_checkpoint-<generation>.json``, last, naming every segment and each shard it
   absorbed, with the shard's identity (size and stamp as listed, and its ``committed_at``),
   and the counts of the rows folded (what a running job's ``status`` reads);
3. ``RETENTION_S`` later, at a later fold, it deletes the absorbed shards and old checkpoints,
   and at once the segments no checkpoint will ever name.

Readers list ``manifests/`` once, read the newest checkpoint and the segments it names, and
read a listed shard only when no checkpoint absorbed it as it is now. A crash at any step loses
nothing and duplicates nothing: before step 2 the segment is named by no checkpoint (the next
fold writes that generation again, under its own token); after it, the shards are skipped. A
repair that commits a shard under an absorbed shard's name (the same rows) changes its
identity, so it is read. Deletion waits so that a reader that listed before a fold still finds
every file it listed.

Only the lease's holder folds, and it checks the lease before each step. A holder that stalled
past its lease may still be inside a step when the next holder folds: the checkpoint is created
only where there is none (the first of two folds of a generation wins, the other stops before
step 3), and neither fold's segment can replace the other's.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.store import layout
from jobs.store.fetched import fetch, fetch_in_order, stamp
from jobs.store.lease import LeaseError
from jobs.store.parquet_files import decode_parquet, parquet_bytes
from jobs.store.tally import Tally
from rendering import storage

logger = logging.getLogger(__name__)

SEGMENT_SHARDS = 64  # shards folded into one segment (output.segment_shards)
RETENTION_S = 60.0  # an absorbed shard or a replaced checkpoint is deleted this long after
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Source:
    """A committed manifest to read: a live shard or a segment."""

    path: str
    first_row: int  # its smallest row_index: sources are merged in input order
    repairs: bool  # some row in it replaces an earlier commit (its redo_of is set)
    columns: frozenset  # its top-level columns
    # A live shard's listing (``fetched.fetch`` keeps it, as readers ask for it again); a
    # segment's is not kept: thousands of them, each read once a command.
    info: dict | None = field(default=None, compare=False)


@dataclass
class Committed:
    """``manifests/`` as listed once: the newest checkpoint and the shards it did not absorb."""

    fs: object
    directory: str
    listing: dict  # name -> listing info, temp objects left out
    checkpoint: dict | None
    shards: list[str]  # paths of the shards no checkpoint absorbed as they are now

    def sources(self, schema: pa.Schema | None = None) -> tuple[list[Source], pa.Schema | None]:
        """Every manifest to read, by their first rows (segments as the checkpoint describes
        them, shards from their footers); given a ``schema``, its union with theirs."""
        sources, schema = self.shard_sources(schema)
        checkpoint = self.checkpoint or {"segments": [], "schemas": []}
        schemas = [_schema_from(s) for s in checkpoint["schemas"]]
        for segment in checkpoint["segments"]:
            own = schemas[segment["schema"]]
            sources.append(Source(storage.join(self.directory, segment["name"]),
                                  segment["first_row"], segment["repairs"], frozenset(own.names)))
            schema = None if schema is None else _union(schema, own)
        return sorted(sources, key=lambda s: s.first_row), schema

    def shard_sources(self, schema: pa.Schema | None = None
                      ) -> tuple[list[Source], pa.Schema | None]:
        """What each live shard's footer says; given a ``schema``, its union with every
        shard's. A shard manifest is small: it is fetched whole (and kept: ``fetched``) and its
        footer decoded from memory."""
        infos = [self.listing[path.rsplit("/", 1)[-1]] for path in self.shards]
        sources = []
        for path, info, data in zip(self.shards, infos,
                                    fetch_in_order(self.fs, list(zip(self.shards, infos)))):
            meta = pq.read_metadata(pa.BufferReader(data))
            first_row = min((s.min for s, _ in column_stats(meta, "row_index")
                             if s is not None and s.has_min_max), default=0)
            repairs = any(s is None or not s.has_null_count or s.null_count < rows
                          for s, rows in column_stats(meta, "redo_of"))
            own = meta.schema.to_arrow_schema()
            sources.append(Source(path, first_row, repairs, frozenset(own.names), info))
            schema = None if schema is None else _union(schema, own)
        return sources, schema

    @property
    def empty(self) -> bool:
        return not self.shards and self.checkpoint is None

    def stamps(self) -> list[float | None]:
        """Every committed object's modification stamp (a fold's included)."""
        return [stamp(info) for name, info in self.listing.items()
                if name.startswith((layout.SHARD_PREFIX, layout.SEGMENT_PREFIX,
                                    layout.CHECKPOINT_PREFIX))]


def read_committed(fs, root: str) -> Committed:
    directory = storage.join(root, layout.MANIFESTS_DIR)
    fs.invalidate_cache(directory)  # workers and other drivers write here too
    try:
        listed = fs.ls(directory, detail=True)
    except FileNotFoundError:
        listed = []
    listing = {o["name"].rsplit("/", 1)[-1]: o for o in listed
               if o.get("type") != "directory" and not storage.is_temp(o["name"])}
    checkpoint = _newest_checkpoint(fs, directory, listing)
    if checkpoint is not None:
        missing = [s["name"] for s in checkpoint["segments"] if s["name"] not in listing]
        if missing:
            raise FileNotFoundError(
                f"{storage.to_uri(fs, directory)}/{missing[0]} is named by the manifests' "
                f"checkpoint but missing ({len(missing)} segment(s)): the output was damaged")
    absorbed = (checkpoint or {}).get("absorbed", {})
    shards = [info["name"] for name, info in sorted(listing.items())
              if _is_shard(name) and not _absorbed(fs, info, absorbed.get(name))]
    return Committed(fs, directory, listing, checkpoint, shards)


def _is_shard(name: str) -> bool:
    return name.startswith(layout.SHARD_PREFIX) and name.endswith(".parquet")


def _checkpoints(listing: dict) -> list[str]:
    return sorted(n for n in listing if n.startswith(layout.CHECKPOINT_PREFIX) and n.endswith(".json"))


def _newest_checkpoint(fs, directory: str, listing: dict) -> dict | None:
    names = _checkpoints(listing)
    if not names:
        return None
    path = storage.join(directory, names[-1])
    try:
        checkpoint = json.loads(storage.with_retries(f"read of {path}", fetch, fs, path,
                                                     listing[names[-1]]))
    except ValueError as exc:
        raise ValueError(f"{storage.to_uri(fs, path)} is not valid JSON ({exc}): it was not "
                         f"written by reelfarm, or was edited") from None
    if not isinstance(checkpoint.get("version"), int) or checkpoint["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"{storage.to_uri(fs, path)} is in checkpoint format "
                         f"{checkpoint.get('version')!r}, newer than this reelfarm reads: upgrade it")
    return checkpoint


def _identity(info: dict) -> list:
    """What a listing says of an object: its size and stamp (a rewrite changes them)."""
    return [info.get("size"), stamp(info)]


def _absorbed(fs, info: dict, record: dict | None) -> bool:
    """The listed shard is the one ``record`` absorbed: listed as it was then, or (copied,
    so stamped anew) committed at the same instant."""
    if record is None:
        return False
    if _identity(info) == record["identity"]:
        return True
    try:
        table = decode_parquet(fetch(fs, info["name"], info), columns=["committed_at"])
    except FileNotFoundError:  # deleted since it was listed: by a fold, so absorbed
        return True
    return table.num_rows > 0 and pc.max(table["committed_at"]).as_py() == record["committed_at"]


def _schema_from(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def _union(schema: pa.Schema, other: pa.Schema) -> pa.Schema:
    return schema if other.equals(schema) else \
        pa.unify_schemas([schema, other], promote_options="permissive")


def column_stats(meta: pq.FileMetaData, column: str) -> list[tuple]:
    """(statistics, rows) of each row group's chunk of a top-level ``column`` (none if absent).
    Nested columns take several chunks, so the chunk is found by its path, not the field index."""
    index = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == column), None)
    if index is None:
        return []
    return [(meta.row_group(g).column(index).statistics, meta.row_group(g).num_rows)
            for g in range(meta.num_row_groups)]


def read_in_order(fs, reads: list[tuple[Source, list[str] | None]]):
    """The tables of ``reads`` (a source and its columns, None: all), yielded in order."""
    objects = [(source.path, source.info) for source, _ in reads]
    for data, (_, columns) in zip(fetch_in_order(fs, objects), reads):
        yield decode_parquet(data, columns)


class Folder:
    """Folds committed shards into segments (the driver's, while it holds the lease)."""

    def __init__(self, output_uri: str, segment_shards: int = SEGMENT_SHARDS,
                 held: Callable[[], None] | None = None):
        self.output_uri = output_uri
        self.fs, root = storage.filesystem(output_uri)
        self.root = root
        self.segment_shards = segment_shards
        # Raises once the run lost the output (``Lease.check``): then no step is written.
        self._held = held or (lambda: None)
        self._pending: dict[str, pa.Table] = {}  # shard name -> its rows, committed, not folded
        self.folded = 0  # shards folded by this Folder

    def committed(self, path: str, table: pa.Table) -> None:
        """A shard this run committed; folded with others once there are enough."""
        self._pending[path.rsplit("/", 1)[-1]] = table
        if len(self._pending) >= self.segment_shards:
            self.fold()

    def fold(self) -> None:
        """Fold the shards this run committed and has not folded yet into one segment."""
        if self._pending:
            tables, self._pending = self._pending, {}
            self._fold(tables, read_committed(self.fs, self.root))

    def fold_listed(self) -> int:
        """Fold the live shards earlier runs left, when there are ``segment_shards`` of them
        (an output made before segments existed is migrated by its next run), a segment per
        ``segment_shards`` in input order; delete what retention allows. Returns the shards
        folded."""
        self._pending = {}  # listed now, with the rest: never folded twice
        committed = read_committed(self.fs, self.root)
        if len(committed.shards) < self.segment_shards:
            self._delete_due(committed)
            return 0
        logger.info("folding %d committed shard manifest(s) into segments", len(committed.shards))
        sources, _ = committed.shard_sources()
        sources.sort(key=lambda s: s.first_row)
        for start in range(0, len(sources), self.segment_shards):
            group = sources[start:start + self.segment_shards]
            names = [s.path.rsplit("/", 1)[-1] for s in group]
            tables = read_in_order(self.fs, [(source, None) for source in group])
            committed = self._fold(dict(zip(names, tables)), committed)
        return len(sources)

    def _fold(self, tables: dict[str, pa.Table], before: Committed) -> Committed:
        """Steps 1 to 3 of a fold, from ``manifests/`` as ``before`` listed it."""
        now = time.time()
        checkpoint = before.checkpoint or {"generation": 0, "segments": [], "schemas": [],
                                           "absorbed": {}}
        generation = checkpoint["generation"] + 1
        # Step 1: the segment, under a name of this fold's own: a crashed fold's, or one a
        # holder that lost the lease is still writing, is never replaced.
        name = f"{layout.SEGMENT_PREFIX}{generation:08d}-{uuid.uuid4().hex[:12]}.parquet"
        table = pa.concat_tables(tables.values(), promote_options="permissive").sort_by(
            [("row_index", "ascending"), ("occurrence", "ascending")])
        self._held()
        storage.with_retries("write of a manifest segment", storage.write_bytes, self.fs,
                             storage.join(before.directory, name), parquet_bytes(table))
        # Step 2: the checkpoint. Absorbed shards still listed stay recorded until deleted.
        schemas = list(checkpoint["schemas"])
        encoded = base64.b64encode(table.schema.serialize().to_pybytes()).decode()
        if encoded not in schemas:
            schemas.append(encoded)
        redo = "redo_of" in table.column_names and table["redo_of"].null_count < table.num_rows
        segment = {"name": name, "rows": table.num_rows, "schema": schemas.index(encoded),
                   "first_row": pc.min(table["row_index"]).as_py(), "repairs": bool(redo)}
        absorbed = {shard: rec for shard, rec in checkpoint["absorbed"].items()
                    if shard in before.listing and shard not in tables
                    and _absorbed(self.fs, before.listing[shard], rec)}
        for shard, rows in tables.items():
            info = before.listing.get(shard) or self.fs.info(storage.join(before.directory, shard))
            absorbed[shard] = {"identity": _identity(info), "at": now,
                               "committed_at": pc.max(rows["committed_at"]).as_py()}
        new = {"version": CHECKPOINT_VERSION, "generation": generation, "created_at": now,
               "segments": [*checkpoint["segments"], segment], "schemas": schemas,
               "absorbed": absorbed, "tally": _tally(checkpoint, table, redo)}
        self._held()
        self._create_checkpoint(storage.join(before.directory, _checkpoint_name(generation)),
                                json.dumps(new, sort_keys=True).encode())
        self.folded += len(tables)
        after = read_committed(self.fs, self.root)
        self._delete_due(after)
        return after

    def _create_checkpoint(self, path: str, data: bytes) -> None:
        """Step 2, which only one fold of a generation does: another run's fold got there
        first, so this run has lost the output (or is about to learn it has)."""
        try:
            storage.with_retries("write of a manifest checkpoint", storage.create_bytes,
                                 self.fs, path, data)
        except FileExistsError:
            if fetch(self.fs, path, None) != data:  # else a write of ours, landed and retried
                raise LeaseError(
                    f"another run folded the manifests of output {self.output_uri} "
                    f"({path.rsplit('/', 1)[-1]}) while this one was folding them: this run "
                    f"stops, so that two runs never write the output at once; rerun it to "
                    f"resume") from None

    def _delete_due(self, committed: Committed) -> None:
        """Step 3: the absorbed shards and replaced checkpoints no reader can need any more,
        and the segments no checkpoint names of a generation that has one (a fold's that
        crashed or lost the race to its checkpoint): no later checkpoint can name them. A
        deleted shard stays recorded in the newest checkpoint until a later fold drops it."""
        self._held()
        now = time.time()
        absorbed = (committed.checkpoint or {}).get("absorbed", {})
        due = [n for n, rec in absorbed.items() if n in committed.listing
               and now - rec["at"] >= RETENTION_S
               and _absorbed(self.fs, committed.listing[n], rec)]
        # Checkpoints before the newest one that is itself past retention: a reader lists
        # and then reads the newest it listed, within RETENTION_S.
        names = _checkpoints(committed.listing)
        settled = [n for n in names if now - (stamp(committed.listing[n]) or now) >= RETENTION_S]
        stale = [n for n in names if settled and n < settled[-1]]
        checkpoint = committed.checkpoint or {"generation": 0, "segments": []}
        named = {segment["name"] for segment in checkpoint["segments"]}
        generations = {n: _segment_generation(n) for n in committed.listing}
        stale += [n for n, g in generations.items()
                  if g is not None and g <= checkpoint["generation"] and n not in named]
        if due or stale:
            try:
                self.fs.rm([storage.join(committed.directory, n) for n in [*due, *stale]])
            except OSError as exc:  # a later fold deletes them: readers skip them meanwhile
                logger.warning("could not delete %d folded manifest(s) yet: %s",
                               len(due) + len(stale), exc)


def _tally(checkpoint: dict, table: pa.Table, repairs: bool) -> dict | None:
    """The counts of every folded row, with ``table``'s: None (unknown, so readers count the
    rows) once a repair is folded, as its replaced commit would be counted too."""
    before = checkpoint.get("tally", {} if not checkpoint["segments"] else None)
    if before is None or repairs:
        return None
    counts = Tally.from_json(before) if before else Tally()
    counts.add(table)
    return counts.to_json()


def _segment_generation(name: str) -> int | None:
    """The generation in a segment's name (``segment-<generation>[-<token>].parquet``)."""
    if not (name.startswith(layout.SEGMENT_PREFIX) and name.endswith(".parquet")):
        return None
    digits = name[len(layout.SEGMENT_PREFIX):-len(".parquet")].split("-")[0]
    return int(digits) if digits.isdigit() else None


def _checkpoint_name(generation: int) -> str:
    return f"{layout.CHECKPOINT_PREFIX}{generation:08d}.json"
