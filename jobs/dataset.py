"""The prompt dataset: Parquet files on any fsspec URL, checked up front, then streamed.

A file, a folder (every ``*.parquet`` below it) or a glob. Files are read in sorted order, one
record batch at a time, so the driver's memory does not grow with the dataset.

Every file's footer and schema are checked before anything expensive starts: one corrupt,
truncated, empty or mislabelled file stops the job with an error that names it (a silently
skipped file would be a silently missing part of a nightly dataset). A file whose data pages
turn out to be corrupt while streaming stops the job the same way; what was committed stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.rows import FLOAT_COLUMNS, INT_COLUMNS
from rendering import storage


class InputError(ValueError):
    """The input cannot be read as a prompt dataset; the message names the file and the fix."""


@dataclass(frozen=True)
class InputFile:
    path: str
    num_rows: int


@dataclass(frozen=True)
class InputDataset:
    uri: str
    files: tuple[InputFile, ...]
    columns: tuple[str, ...]  # the columns to read: prompt, the known optional ones, carried ones

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def open_dataset(uri: str, carry_columns: list[str]) -> InputDataset:
    """List the input's files and check each one's footer and schema."""
    fs, path = storage.filesystem(uri)
    paths = _list_files(fs, path, uri)
    files, columns = [], None
    for file_path in paths:
        schema, num_rows = _read_footer(fs, file_path)
        file_columns = _check_schema(schema, carry_columns, file_path)
        if columns is None:
            columns = file_columns
        elif set(file_columns) != set(columns):
            raise InputError(f"input file {file_path} has columns {sorted(file_columns)} but "
                             f"{paths[0]} has {sorted(columns)}: all files must share one schema")
        files.append(InputFile(file_path, num_rows))
    return InputDataset(uri, tuple(files), tuple(columns))


def iter_batches(dataset: InputDataset, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream the dataset's columns in file order, ``batch_rows`` rows at a time."""
    fs, _ = storage.filesystem(dataset.uri)
    for file in dataset.files:
        try:
            with fs.open(file.path, "rb") as f:
                reader = pq.ParquetFile(f)
                yield from reader.iter_batches(batch_size=batch_rows, columns=list(dataset.columns))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"input file {file.path} cannot be read: {exc}") from exc


def _list_files(fs, path: str, uri: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if p.endswith(".parquet")
                       and not any(part.startswith((".", "_")) for part in p[len(path):].split("/")))
    elif fs.isfile(path):
        paths = [path]
    else:
        raise InputError(f"input {uri} does not exist: check input.uri (or --input)")
    if not paths:
        raise InputError(f"input {uri} holds no Parquet files (*.parquet)")
    return paths


def _read_footer(fs, path: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"input file {path} is not a readable Parquet file "
                         f"(corrupt, truncated or not Parquet): {exc}") from exc


def _check_schema(schema: pa.Schema, carry_columns: list[str], path: str) -> tuple[str, ...]:
    names = set(schema.names)
    if "prompt" not in names:
        raise InputError(f"input file {path} has no 'prompt' column (columns: "
                         f"{', '.join(schema.names) or 'none'})")
    expectations = {"prompt": _is_text, "negative_prompt": _is_text,
                    "id": lambda t: _is_text(t) or pa.types.is_integer(t)}
    expectations.update({c: _is_number for c in INT_COLUMNS + FLOAT_COLUMNS})
    for name, accepts in expectations.items():
        if name in names and not (accepts(schema.field(name).type) or pa.types.is_null(schema.field(name).type)):
            raise InputError(f"input file {path}: column {name!r} has type "
                             f"{schema.field(name).type}, which reelfarm cannot use here")
    missing = [c for c in carry_columns if c not in names]
    if missing:
        raise InputError(f"input file {path} lacks the carried column(s) {', '.join(missing)} "
                         f"named in input.carry_columns")
    return tuple(c for c in schema.names if c in expectations or c in carry_columns)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)
