"""Small Parquet objects (manifests, indexes) read and written whole, on the caller's thread.

Arrow's decoding threads reading through a Python file object can abort the process at exit
("terminate called without an active exception", apache/arrow#34314, #50482): seen here as a
rare SIGABRT of ``reelfarm status``. These objects hold a few thousand rows, so one thread
costs nothing.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """The table at ``path`` on ``fs`` (only ``columns``, if given), without Arrow's threads."""
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns, use_threads=False)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as one Parquet object, for a write that is complete or absent."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
