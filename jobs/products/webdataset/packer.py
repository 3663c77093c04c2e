"""Committed rows packed into WebDataset tars while a job runs, each once its rows are in.

The driver hands the packer each manifest shard's records as it commits them; the packer holds
the rows of tars not yet complete and packs a complete one on a background thread, so packing
never waits on rendering nor rendering on packing. A resume starts from the output: what is
packed and current is left as it is.

- **Repairs and grown inputs**: a tar's marker records a digest of the rows it was packed from
  (identity, status, artifact hashes). When a repair (``render --redo``) changes a row of a
  packed tar, or a grown input adds rows to the last tar's range, the tar is packed again.
- **keep_videos=False** deletes a packed row's loose artifacts (``videos/<key>.mp4``, ...) once
  its tar's marker is written. The rows stay committed in the manifests, so a resume renders
  nothing again; a later repack of that tar takes the dropped artifacts from the tar's own
  previous copy (checked against the manifest's sha256). A ``verify`` must then look for those
  rows inside the tars (``tar_index.packed_samples``) instead of at their loose paths;
  ``check.check_tars`` checks the tars themselves.
- **skip_duplicates** leaves out the rows ``duplicates.parquet`` marks, so it packs only after
  dedup has judged every row: the driver runs dedup after a run's last commit, then packs from
  the output (``pack_output``); ``reelfarm dedup`` packs again what its new result changes.
  A tar packed before one of its rows was marked (or unmarked) differs in content and is
  packed again, like a repaired one.
"""

from __future__ import annotations

import logging
import queue
import threading

import pyarrow as pa

from jobs.products.webdataset.tar_index import folder_paths, read_at_once, read_markers
from jobs.products.webdataset.tar_writer import pack_tar
from jobs.products.webdataset.tars import (Content, PackError, PackSpec, artifacts, tar_count,
                                           tar_name, tar_range)
from jobs.store import layout, manifest
from jobs.store.duplicates import Marks
from rendering import storage

logger = logging.getLogger(__name__)

# Completed tars waiting for the packing thread: enough to ride out one slow upload without
# holding many tars' records in memory; past it add() waits (packing is far faster than
# rendering, so in practice it never does).
QUEUE_TARS = 2


class Packer:
    """Packs each tar once all its rows are committed, on one background thread.

    The driver creates it at the start of a run, calls ``seed_from_output()`` (rows committed by
    earlier runs; tars already complete are packed, stale ones packed again), hands it every
    manifest shard's records right after it is committed (``add``), and calls ``close()`` at
    the end. Only records of tars not yet packed are held in memory.
    """

    def __init__(self, output_uri: str, spec: PackSpec, total_rows: int):
        self.output_uri = output_uri
        self.spec = spec
        self.total_rows = total_rows
        self.num_tars = tar_count(total_rows, spec.rows_per_shard)
        self.packed = 0  # tars this packer wrote
        self.already_packed = 0  # tars found packed (and current) by seed_from_output
        self._fs, self._root = storage.filesystem(output_uri)
        self._pending: dict[int, dict[int, dict]] = {}  # tar -> row_index -> record
        self._closed: set[int] = set()  # packed, or queued to be: records go no further
        self._touched: set[int] = set()  # closed tars that got a new commit (a repair)
        self._seeded = False
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_TARS)
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    # -- the driver's side ---------------------------------------------------------------------

    def seed_from_output(self) -> None:
        """Take in what earlier runs committed: pack the tars that are complete but not
        packed, pack again those whose rows changed since, and hold the rest until complete."""
        spec = self.spec
        # Step 1: read the markers; a tar counts as packed if its range is still its range
        # (a grown input widens the last one, which is then packed again once complete).
        markers = read_markers(self.output_uri)
        listing = {p.rsplit("/", 1)[-1] for p in folder_paths(self._fs, self._root)}
        for n, marker in sorted(markers.items()):
            if marker.get("rows_per_shard") != spec.rows_per_shard:
                raise PackError(
                    f"{self.output_uri}/{layout.SHARDS_DIR} was packed with rows_per_shard="
                    f"{marker.get('rows_per_shard')}, this job asks for {spec.rows_per_shard}: "
                    f"keep {marker.get('rows_per_shard')}, or render to a new output")
        done = {n: m for n, m in markers.items() if n < self.num_tars
                and (m["first_row"], m["end_row"]) == self._range(n)
                and {m["tar"], m["index"]} <= listing}  # a deleted tar is packed again
        contents = {n: Content(spec) for n in done}
        last_artifact: dict[int, tuple[int, str]] = {}  # tar -> (row_index, path), for step 4

        # Step 2: read every committed row once, in input order: rows of packed tars only
        # feed their digest; the others are held, and their tar is packed once complete.
        for table in self._committed():
            touched = set()
            for rec in _stored_rows(table):
                n = rec["row_index"] // spec.rows_per_shard
                if n >= self.num_tars:
                    continue
                if n in done:
                    contents[n].add(rec)
                    paths = [a["path"] for a in artifacts(rec)] if rec["status"] == "ok" else []
                    if paths and rec["row_index"] >= last_artifact.get(n, (-1, ""))[0]:
                        last_artifact[n] = (rec["row_index"], paths[-1])
                else:
                    self._pending.setdefault(n, {})[rec["row_index"]] = rec
                    touched.add(n)
            for n in sorted(touched):
                self._pack_if_complete(n)
        self._seeded = True

        # Step 3: a packed tar whose rows changed since (a repair) is packed again.
        stale = {n for n in done if contents[n].value != done[n]["content"]}
        # Step 4: keep_videos=False deletes a tar's last artifact last, so its presence means
        # an interrupted run left the tar's loose artifacts behind: delete them now.
        unpruned = set()
        if not spec.keep_videos:
            candidates = sorted((n, path) for n, (_, path) in last_artifact.items()
                                if n not in stale)
            exists = read_at_once(lambda p: self._fs.exists(storage.join(self._root, p)),
                                  [path for _, path in candidates])
            unpruned = {n for (n, _), found in zip(candidates, exists) if found}
        self._closed.update(done)  # stale ones are queued below: closed as well
        self.already_packed = len(done) - len(stale)
        if stale or unpruned:
            logger.info("packing again %d shard(s) whose rows changed; dropping the loose "
                        "artifacts of %d packed shard(s)", len(stale), len(unpruned))
            self._recheck(stale | unpruned)

    def add(self, records: list[dict]) -> None:
        """Take the records of a committed shard manifest (as ``jobs.run.records.record`` makes
        them); queue every tar they complete. Returns at once unless packing is ``QUEUE_TARS``
        tars behind."""
        if not self._seeded:
            raise RuntimeError("Packer.seed_from_output() must run before add()")
        if self.spec.skip_duplicates:
            raise RuntimeError("a packer that leaves duplicates out packs from the output, "
                               "after dedup: pack_output()")
        if not records:
            return
        touched = set()
        for rec in _stored_rows(manifest.to_table(records)):
            n = rec["row_index"] // self.spec.rows_per_shard
            if n >= self.num_tars:
                logger.warning("row %r (row_index %d) is past the input's %d rows: not packed",
                               rec["id"], rec["row_index"], self.total_rows)
            elif n in self._closed:
                self._touched.add(n)  # a repair of a packed tar: checked in close()
            else:
                self._pending.setdefault(n, {})[rec["row_index"]] = rec
                touched.add(n)
        for n in sorted(touched):
            self._pack_if_complete(n)

    @property
    def pending_rows(self) -> int:
        """Records held for tars not complete yet (the packer's memory)."""
        return sum(len(rows) for rows in self._pending.values())

    def flush(self) -> None:
        """Wait until every tar queued so far is packed (or failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self, cancel: bool = False) -> None:
        """Wait for pending packing, pack again the packed tars a repair changed, and raise
        the first packing error. ``cancel``: drop queued tars (the next run packs them) and
        wait only for the one being written."""
        if self._thread is not None:
            if cancel:
                try:
                    while True:
                        self._queue.get_nowait()
                        self._queue.task_done()
                except queue.Empty:
                    pass
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if not cancel and self._touched and not self._errors:
            touched, self._touched = self._touched, set()
            try:
                self._recheck(touched, background=False)
            except Exception as exc:  # noqa: BLE001 - reported below like any packing error
                self._errors.append(exc)
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> "Packer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        try:  # the run failed: stop quickly, and never mask its error with a packing one
            self.close(cancel=True)
        except Exception as error:  # noqa: BLE001
            logger.warning("packing also failed: %s", error)
        return False

    # -- internals -----------------------------------------------------------------------------

    def _committed(self):
        """The committed rows in input order, marked by ``duplicates.parquet`` when the tars
        leave duplicates out."""
        marks = Marks.read(self.output_uri) if self.spec.skip_duplicates else None
        for table in manifest.iter_shards(self.output_uri):
            yield table if marks is None else marks.mark(table)

    def _range(self, n: int) -> tuple[int, int]:
        return tar_range(n, self.spec.rows_per_shard, self.total_rows)

    def _pack_if_complete(self, n: int) -> None:
        first, end = self._range(n)
        rows = self._pending.get(n, {})
        if len(rows) == end - first:
            del self._pending[n]
            self._closed.add(n)
            self._submit(n, [rows[i] for i in range(first, end)])

    def _submit(self, n: int, records: list[dict]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="reelfarm-pack", daemon=True)
            self._thread.start()
        self._queue.put((n, records))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._pack(*job)
            finally:
                self._queue.task_done()

    def _pack(self, n: int, records: list[dict]) -> None:
        try:
            if pack_tar(self.output_uri, self.spec, n, self._range(n), records):
                self.packed += 1
        except Exception as exc:  # noqa: BLE001 - kept for close(); other tars go on
            logger.error("could not pack shard %s: %s: %s", tar_name(n), type(exc).__name__, exc)
            self._errors.append(exc)

    def _recheck(self, tars: set[int], background: bool = True) -> None:
        """Read the current rows of ``tars`` again and pack each (``pack_tar`` writes only
        what changed, and drops loose artifacts when asked)."""
        found: dict[int, dict[int, dict]] = {n: {} for n in tars}
        for table in self._committed():
            for rec in _stored_rows(table):
                n = rec["row_index"] // self.spec.rows_per_shard
                if n in found:
                    found[n][rec["row_index"]] = rec
        for n in sorted(tars):
            first, end = self._range(n)
            if len(found[n]) != end - first:
                logger.warning("shard %s lost committed rows since it was packed: left as it is",
                               tar_name(n))
                continue
            records = [found[n][i] for i in range(first, end)]
            if background:
                self._submit(n, records)
            else:
                self._pack(n, records)


def pack_output(output_uri: str, spec: PackSpec, total_rows: int) -> Packer:
    """Pack every tar whose rows are all committed, from the output, and wait for it."""
    with Packer(output_uri, spec, total_rows) as packer:
        packer.seed_from_output()
    return packer


def _stored_rows(table: pa.Table) -> list[dict]:
    """Rows as the manifest stores them (every schema column, carried columns by their own
    names), whether read back from Parquet or just made by ``manifest.to_table``: the JSON of a
    sample is then the same whichever way its row reached the packer."""
    names = manifest.SCHEMA.names
    known = set(names)
    rows = []
    for row in table.to_pylist():
        rec = {name: row.get(name) for name in names}
        rec.update((k, v) for k, v in row.items() if k not in known and k != "key")
        rows.append(rec)
    return rows
