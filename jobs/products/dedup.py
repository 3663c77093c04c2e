"""Near-duplicates: ok rows whose video embeddings are closer than a threshold.

Training sets lose value to near-copies (the same prompt and seed under two ids, a model that
collapses to one picture). dedup compares every ok row's ``clip_embedding`` (unit length, so a
dot product is a cosine) with earlier rows' (``jobs.products.nearest``: exact, or within
k-means buckets), and marks a row as a duplicate of its most similar earlier row (the earliest
of equals) when their similarity is at least ``threshold``; the first of a group stays
unmarked. As SemDeDup, every later member of a near-copy chain is marked, even one that is
near only to a marked row.

Memory stays bounded at any size: the embeddings stream from the manifests into a local
float16 file read through ``numpy.memmap``, and are compared a block at a time. The result
is ``duplicates.parquet`` (``jobs.store.duplicates``: each entry names the two commits it
judged); ``reelfarm dedup`` then consolidates ``manifest.parquet``, which fills
``duplicate_of`` and ``duplicate_similarity`` from it, and packs again the WebDataset tars
that leave duplicates out. A run with ``quality.dedup`` finds them after its last commit
(``find_duplicates``), before it consolidates and packs.
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

from jobs.config import DEDUP_THRESHOLD
from jobs.products.nearest import SEARCHES, nearest_earlier
from jobs.products.webdataset.packer import pack_output
from jobs.products.webdataset.tars import PackSpec
from jobs.store import layout, manifest
from jobs.store.duplicates import SCHEMA
from jobs.store.job_file import read_job, require_output
from jobs.store.lease import acquire as acquire_lease
from jobs.store.parquet_files import parquet_bytes
from rendering import storage

logger = logging.getLogger(__name__)

# 4096 rows a block: a 64 MB float32 similarity block; bigger blocks are no faster per pair.
BLOCK_ROWS = 4096
_KEYS = ["id", "occurrence", "row_index", "committed_at"]


class DedupError(ValueError):
    """The output cannot be deduplicated as asked; says why."""


@dataclass
class Found:
    rows: int  # ok rows with an embedding, compared
    duplicates: int
    seconds: float


def dedup(output_uri: str, threshold: float = DEDUP_THRESHOLD, block_rows: int = BLOCK_ROWS,
          search: str = "exact") -> Found:
    """``reelfarm dedup``, holding the output's lease (no run may commit meanwhile): find the
    near-duplicates, write ``manifest.parquet`` with them, and pack again the tars of a job
    with ``output.webdataset.skip_duplicates`` whose left-out rows changed. An output with no
    scored ok row is refused."""
    require_output(output_uri)  # a typo is an error, not a lease taken on a new folder
    lease = acquire_lease(output_uri)
    try:
        found = find_duplicates(output_uri, threshold, block_rows, search, require_rows=True)
        manifest.consolidate(output_uri)
        _pack_again(output_uri)
    finally:
        lease.release()
    return found


def _pack_again(output_uri: str) -> None:
    """Pack the tars again as the job that made the output packs them, if they leave
    duplicates out (only those whose content changed are written)."""
    job = read_job(output_uri) or {}
    output = (job.get("config") or {}).get("output") or {}
    webdataset = output.get("webdataset") or {}
    if webdataset.get("skip_duplicates"):
        spec = PackSpec(webdataset["rows_per_shard"], output["keep_videos"], True)
        pack_output(output_uri, spec, job["last_run"]["input_rows"])


def find_duplicates(output_uri: str, threshold: float = DEDUP_THRESHOLD,
                    block_rows: int = BLOCK_ROWS, search: str = "exact",
                    require_rows: bool = False) -> Found:
    """Find the near-duplicates among the current commits and write ``duplicates.parquet``
    (see the module docstring). ``require_rows``: refuse an output with no scored ok row,
    rather than find nothing in it."""
    if not -1.0 <= threshold <= 1.0:
        raise DedupError(f"threshold {threshold} is not a cosine similarity (-1 to 1)")
    if block_rows < 1:
        raise DedupError(f"block_rows must be at least 1, got {block_rows}")
    if search not in SEARCHES:
        raise DedupError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    started = time.monotonic()
    if manifest.committed(output_uri).empty:
        raise DedupError(f"{output_uri} has no committed rows: render it first")
    with tempfile.TemporaryDirectory(prefix="reelfarm-dedup-") as tmp:
        # Step 1: stream the ok rows' embeddings to a local file; keep their identities.
        path = os.path.join(tmp, "embeddings.f16")
        rows, size = _spill(output_uri, path)
        if not rows.num_rows and require_rows:
            raise DedupError(f"{output_uri} has no ok row with a clip_embedding: render it with "
                             f"quality.clip_model set")
        # Step 2: every row's most similar earlier row, block by block.
        if rows.num_rows:
            embeddings = np.memmap(path, np.float16, "r", shape=(rows.num_rows, size))
            best, similarity = nearest_earlier(embeddings, block_rows, search)
            del embeddings
        else:
            best, similarity = np.zeros(0, np.int64), np.zeros(0, np.float32)
    # Step 3: the table of duplicates, each with the commits it judged.
    marked = np.flatnonzero(similarity >= threshold)
    rows = rows.select(_KEYS)
    earlier = rows.take(best[marked])
    table = pa.table({**{k: rows[k].take(marked) for k in _KEYS},
                      "duplicate_of": earlier["id"],
                      "duplicate_of_occurrence": earlier["occurrence"],
                      "duplicate_of_committed_at": earlier["committed_at"],
                      "similarity": pa.array(similarity[marked].astype(np.float64))}
                     ).select(SCHEMA.names).cast(SCHEMA)
    fs, root = storage.filesystem(output_uri)
    storage.write_bytes(fs, storage.join(root, layout.DUPLICATES_FILE), parquet_bytes(table))
    found = Found(rows.num_rows, table.num_rows, time.monotonic() - started)
    logger.info("dedup: %d of %d ok rows are near-duplicates (similarity >= %g, %s search), "
                "in %.1f s", found.duplicates, found.rows, threshold, search, found.seconds)
    return found


def _spill(output_uri: str, path: str) -> tuple[pa.Table, int]:
    """Write the ok rows' embeddings (float16, row after row) to ``path``; their ids,
    occurrences, row indexes and commits (Arrow, a few bytes a row), and the embedding size."""
    kept, size = [], None
    with open(path, "wb") as out:
        for table in manifest.current_rows(output_uri, [*_KEYS, "status", "clip_embedding"]):
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
            kept.append(table.select(_KEYS))
    empty = pa.table({k: pa.array([], manifest.SCHEMA.field(k).type) for k in _KEYS})
    return pa.concat_tables([empty, *kept]).combine_chunks(), size or 0
