"""Near-duplicates: ok rows whose video embeddings are closer than a threshold, found exactly.

Training sets lose value to near-copies (the same prompt and seed under two ids, a model that
collapses to one picture). ``reelfarm dedup OUTPUT`` compares every ok row's ``clip_embedding``
(unit length, so a dot product is a cosine) with every earlier row's, and marks a row as a
duplicate of its most similar earlier row (the earliest of equals) when their similarity is at
least ``threshold``; the first of a group stays unmarked. As SemDeDup, every later member of a
near-copy chain is marked, even one that is near only to a marked row.

Memory stays bounded at any size: the embeddings stream from the manifest into a local
float16 file read through ``numpy.memmap``, and are compared ``block_rows`` by ``block_rows``
(a (block, block) float32 similarity block, plus per row its best earlier match). The work is
exact and quadratic: ``bench/dedup.py`` measures it. The result is written twice:

- ``duplicates.parquet``: one row per duplicate (id, occurrence, row_index, duplicate_of,
  duplicate_of_occurrence, similarity);
- ``manifest.parquet``: its ``duplicate_of`` and ``duplicate_similarity`` columns filled
  (rewritten whole, streaming; a later consolidation resets them: run dedup again).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.store import layout, manifest
from jobs.store.parquet_files import parquet_bytes
from rendering import storage

logger = logging.getLogger(__name__)

DUPLICATES_FILE = "duplicates.parquet"
DEFAULT_THRESHOLD = 0.95  # cosine: SemDeDup's eps = 0.05
# 4096 rows a block: a 64 MB float32 similarity block; bigger blocks are no faster per pair.
BLOCK_ROWS = 4096
SCHEMA = pa.schema([("id", pa.string()), ("occurrence", pa.int32()), ("row_index", pa.int64()),
                    ("duplicate_of", pa.string()), ("duplicate_of_occurrence", pa.int32()),
                    ("similarity", pa.float64())])
_READ = ["id", "occurrence", "row_index", "status", "clip_embedding"]


class DedupError(ValueError):
    """The output cannot be deduplicated as asked; says why."""


@dataclass
class Found:
    rows: int  # ok rows with an embedding, compared
    duplicates: int
    seconds: float


def dedup(output_uri: str, threshold: float = DEFAULT_THRESHOLD,
          block_rows: int = BLOCK_ROWS) -> Found:
    """Find the output's near-duplicates and write them (see the module docstring)."""
    if not -1.0 <= threshold <= 1.0:
        raise DedupError(f"threshold {threshold} is not a cosine similarity (-1 to 1)")
    if block_rows < 1:
        raise DedupError(f"block_rows must be at least 1, got {block_rows}")
    started = time.monotonic()
    fs, root = storage.filesystem(output_uri)
    if manifest.committed(output_uri).empty:
        raise DedupError(f"{output_uri} has no committed rows: render it first")
    # Step 1: manifest.parquet holds every commit, so the column can be written into it.
    if not manifest.consolidated_is_current(output_uri):
        manifest.consolidate(output_uri)
    with tempfile.TemporaryDirectory(prefix="reelfarm-dedup-") as tmp:
        # Step 2: stream the ok rows' embeddings to a local file; keep their identities.
        path = os.path.join(tmp, "embeddings.f16")
        ids, occurrences, rows, size = _spill(output_uri, path)
        if not ids:
            raise DedupError(f"{output_uri} has no ok row with a clip_embedding: render it with "
                             f"quality.clip_model set")
        embeddings = np.memmap(path, np.float16, "r", shape=(len(ids), size))
        # Step 3: every row's most similar earlier row, block by block.
        best, similarity = nearest_earlier(embeddings, block_rows)
        del embeddings
    marked = np.flatnonzero(similarity >= threshold)
    table = pa.table({
        "id": [ids[i] for i in marked], "occurrence": [occurrences[i] for i in marked],
        "row_index": [rows[i] for i in marked],
        "duplicate_of": [ids[best[i]] for i in marked],
        "duplicate_of_occurrence": [occurrences[best[i]] for i in marked],
        "similarity": similarity[marked].astype(np.float64)}, schema=SCHEMA)
    # Step 4: the table, then the manifest's columns.
    storage.write_bytes(fs, storage.join(root, DUPLICATES_FILE), parquet_bytes(table))
    _mark_manifest(output_uri, table)
    found = Found(len(ids), table.num_rows, time.monotonic() - started)
    logger.info("dedup: %d of %d ok rows are near-duplicates (similarity >= %g), in %.1f s",
                found.duplicates, found.rows, threshold, found.seconds)
    return found


def nearest_earlier(embeddings: np.ndarray, block_rows: int = BLOCK_ROWS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of (N, D) unit ``embeddings``: the index of its most similar earlier row
    (the earliest of equals) and that cosine similarity (-inf for row 0)."""
    n = len(embeddings)
    best = np.zeros(n, np.int64)
    similarity = np.full(n, -np.inf, np.float32)
    for start in range(0, n, block_rows):
        rows = np.asarray(embeddings[start:start + block_rows], np.float32)
        for other in range(0, start + len(rows), block_rows):
            columns = np.asarray(embeddings[other:other + block_rows], np.float32)
            block = rows @ columns.T
            if other == start:  # the diagonal block: only earlier rows count
                block[np.triu_indices(len(rows), 0, len(columns))] = -np.inf
            arg = block.argmax(axis=1)
            value = np.take_along_axis(block, arg[:, None], axis=1)[:, 0]
            mine = slice(start, start + len(rows))
            better = value > similarity[mine]  # strictly: an earlier block keeps its ties
            best[mine] = np.where(better, arg + other, best[mine])
            similarity[mine] = np.where(better, value, similarity[mine])
    return best, similarity


def _spill(output_uri: str, path: str) -> tuple[list, list, list, int]:
    """Write the ok rows' embeddings (float16, row after row) to ``path``; their ids,
    occurrences and row indexes, and the embedding size."""
    ids, occurrences, rows, size = [], [], [], None
    with open(path, "wb") as out:
        for table in manifest.current_rows(output_uri, _READ):
            table = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                         pc.is_valid(table["clip_embedding"])))
            if not table.num_rows:
                continue
            lists = table["clip_embedding"].combine_chunks()
            sizes = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
            size = size or int(sizes[0])
            if (sizes != size).any():
                raise DedupError(f"{output_uri}: clip_embedding sizes differ ({size} and "
                                 f"{int(sizes[sizes != size][0])}): rows scored by different "
                                 f"CLIP models cannot be compared")
            values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
            out.write(values.tobytes())
            ids += table["id"].to_pylist()
            occurrences += table["occurrence"].to_pylist()
            rows += table["row_index"].to_pylist()
    return ids, occurrences, rows, size or 0


def _mark_manifest(output_uri: str, duplicates: pa.Table) -> None:
    """Rewrite ``manifest.parquet`` with ``duplicate_of`` and ``duplicate_similarity`` set
    from ``duplicates`` (and cleared elsewhere), a batch at a time."""
    fs, root = storage.filesystem(output_uri)
    marks = {(i, o): (d, s) for i, o, d, s in zip(
        duplicates["id"].to_pylist(), duplicates["occurrence"].to_pylist(),
        duplicates["duplicate_of"].to_pylist(), duplicates["similarity"].to_pylist())}
    schema = manifest.consolidated_schema(output_uri)
    names = [n for n in schema.names if n not in ("duplicate_of", "duplicate_similarity")]
    fields = [manifest.SCHEMA.field("duplicate_of"), manifest.SCHEMA.field("duplicate_similarity")]
    schema = pa.schema([schema.field(n) for n in names] + fields)
    with tempfile.TemporaryDirectory(prefix="reelfarm-dedup-") as tmp:
        local = os.path.join(tmp, layout.MANIFEST_FILE)
        with pq.ParquetWriter(local, schema) as writer:
            for table in manifest.iter_consolidated(output_uri, names):
                found = [marks.get(key, (None, None)) for key in
                         zip(table["id"].to_pylist(), table["occurrence"].to_pylist())]
                table = table.append_column(fields[0], pa.array([f[0] for f in found], pa.string()))
                table = table.append_column(fields[1], pa.array([f[1] for f in found], pa.float64()))
                writer.write_table(table, row_group_size=manifest.ROW_GROUP_ROWS)
        storage.upload_file(local, fs, storage.join(root, layout.MANIFEST_FILE))
