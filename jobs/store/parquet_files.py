"""Small Parquet objects (manifests, indexes) read and written whole, on the caller's thread.

Arrow's threads reading through a Python file object can abort the process at exit ("terminate
called without an active exception", apache/arrow#34314, #50482): seen here as a SIGABRT of
``reelfarm status`` on a 100k-row output, once in 20 runs on a loaded machine. These objects
hold a few thousand rows: each is read whole into memory and decoded on the caller's thread.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """The table at ``path`` on ``fs`` (only ``columns``, if given), read whole into memory
    first: given a Python file object, Arrow reads it from its I/O threads (``pre_buffer``),
    even with ``use_threads=False``, and that is what aborted ``reelfarm status`` at exit."""
    return decode_parquet(fs.cat_file(path), columns)


def decode_parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet object already in memory, decoded on the caller's thread."""
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as one Parquet object, for a write that is complete or absent."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
