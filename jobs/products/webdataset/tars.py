"""The tars' format: names, membership and keys, fixed so every run and reader agrees on them.

Training code streams tar files (WebDataset); a render farm makes one MP4 per row. Committed
rows are packed into tars from the manifests, never from in-flight state, so reruns, resumes
and repairs all agree on what a tar holds:

```
<output>/shards/00000.tar      samples: {key}.json, {key}.mp4, {key}.txt (+ {key}.clip.npy, artifacts)
<output>/shards/00000.parquet  its index: every row of its range (ok and failed), sample offsets
<output>/shards/00000.done     its marker, written last: samples, bytes, sha256 of the tar
```

- **Membership is fixed by position**: tar ``n`` holds the rows whose ``row_index`` is in
  ``[n * rows_per_shard, (n + 1) * rows_per_shard)`` (clipped to the input's row count). A tar
  is packed once every row of its range is committed; its ok rows become samples, its failed
  rows are listed in the index with status ``failed`` and not packed. No row can be in two
  tars, and no ok row of a packed tar is left out, but with ``skip_duplicates``: an ok row
  that ``duplicates.parquet`` marks (and whose entry holds) is listed in the index with its
  ``duplicate_of``, and not packed. Which rows those are is part of the tar's content digest,
  so a tar packed before dedup marked one of its rows (or unmarked it) is packed again.
- **Sample keys** are the rows' output keys (``jobs.input.rows.output_key``) with every ``.``
  made ``_``: WebDataset cuts a file name at its first dot, so a key may hold none. Output keys
  are unique through the hash of the full id they end with (``-<12 hex>``), which the
  replacement leaves alone, so sample keys are unique too.
- **Members** are in ``samples``; writing a tar exactly once is ``tar_writer``'s; packing tars
  as their rows commit is ``packer``'s; reading them back ``tar_index`` and ``check``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa

from jobs.input.rows import output_key

FORMAT = "reelfarm-webdataset/1"  # in every marker: what wrote the tar and how to read it
TAR_SUFFIX, INDEX_SUFFIX, MARKER_SUFFIX = ".tar", ".parquet", ".done"
VIDEO = "video"  # the artifact that becomes {key}.<its extension>
COPY_CHUNK = 1 << 20  # bytes at a time when a tar's members are copied or hashed

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),  # the sample's key in the tar; null for a failed row (not packed)
    ("id", pa.string()),
    ("row_index", pa.int64()),
    ("occurrence", pa.int32()),
    ("status", pa.string()),
    ("error_code", pa.string()),
    ("member", pa.string()),  # the video's member name in the tar
    ("offset", pa.int64()),  # where the video's bytes start in the tar (for range reads)
    ("bytes", pa.int64()),  # the video's size
    ("sha256", pa.string()),  # the video's sha256
    # The row's clip_embedding (float16, the CLIP model's projection size; null: not scored),
    # so training code can select or dedup samples without opening the tar.
    ("embeddings", pa.list_(pa.float16())),
    # skip_duplicates: the earlier row this ok row near-duplicates (not packed); else null.
    ("duplicate_of", pa.string()),
])


class PackError(RuntimeError):
    """A tar cannot be packed (or the output's tars disagree with this job); says why."""


@dataclass(frozen=True)
class PackSpec:
    """How committed rows become WebDataset tars (``output.webdataset``)."""

    rows_per_shard: int = 1000  # input rows per tar, ok and failed: fixes each tar's range
    keep_videos: bool = True  # False: delete a row's loose artifacts once its tar is packed
    skip_duplicates: bool = False  # leave out the rows duplicates.parquet marks

    def __post_init__(self):
        if not isinstance(self.rows_per_shard, int) or self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be a positive integer, got "
                             f"{self.rows_per_shard!r}")


def sample_key(row_id: str) -> str:
    """The WebDataset key of a row: its output key with no dots (see the module docstring)."""
    return output_key(row_id).replace(".", "_")


def tar_count(total_rows: int, rows_per_shard: int) -> int:
    return -(-total_rows // rows_per_shard)


def tar_range(n: int, rows_per_shard: int, total_rows: int) -> tuple[int, int]:
    """The row_index range [first, end) of tar ``n``."""
    first = n * rows_per_shard
    return first, min(first + rows_per_shard, total_rows)


def tar_name(n: int) -> str:
    return f"{n:05d}"


def tar_number(path: str, suffix: str) -> int | None:
    """``n`` of a path named ``<tar_name(n)><suffix>``; None for any other name."""
    name = path.rsplit("/", 1)[-1]
    stem = name[:-len(suffix)]
    return int(stem) if name.endswith(suffix) and stem.isdigit() else None


def sample_hash(row_id: str, occurrence: int, sha256: str | None) -> int:
    """64-bit key of a packed row and its video's hash, for ``packed_samples`` lookups."""
    text = f"{row_id}\x00{occurrence}\x00{sha256}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def left_out(rec: dict, spec: PackSpec) -> bool:
    """An ok row not packed: a near-duplicate of an earlier row, with ``skip_duplicates``."""
    return spec.skip_duplicates and rec["status"] == "ok" and rec.get("duplicate_of") is not None


def artifacts(rec: dict) -> list[dict]:
    """A row's stored objects; manifests from before ``artifacts`` existed list only the video."""
    if rec.get("artifacts"):
        return rec["artifacts"]
    if rec["status"] == "ok" and rec.get("video_uri"):
        return [{"name": VIDEO, "path": rec["video_uri"], "bytes": rec["bytes"],
                 "sha256": rec["sha256"]}]
    return []


class Content:
    """An order-free digest of the rows a tar was packed from: identity, status and artifact
    hashes (and, with ``skip_duplicates``, which rows were left out). Rows can be added in any
    order (a manifest scan meets them scattered), so a resume can tell whether a packed tar
    still matches the manifests without holding them."""

    def __init__(self, spec: PackSpec):
        self.spec = spec
        self.rows = 0
        self._sum = 0

    def add(self, rec: dict) -> None:
        hashes = sorted(f"{a['name']}={a['sha256']}" for a in artifacts(rec))
        status = "duplicate" if left_out(rec, self.spec) else rec["status"]
        identity = "\x00".join([str(rec["row_index"]), str(rec["occurrence"]), rec["id"],
                                status, ",".join(hashes)])
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).digest()
        self._sum = (self._sum + int.from_bytes(digest, "big")) % (1 << 256)
        self.rows += 1

    @property
    def value(self) -> str:
        # A tar packed with the other skip_duplicates setting is packed again.
        skip = ":skip_duplicates" if self.spec.skip_duplicates else ""
        return f"{self.rows}:{self._sum:064x}{skip}"


def content_of(records: Iterable[dict], spec: PackSpec) -> str:
    content = Content(spec)
    for rec in records:
        content.add(rec)
    return content.value
