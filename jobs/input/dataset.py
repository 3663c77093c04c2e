"""The prompt dataset: Parquet files on any fsspec URL, checked up front, then streamed.

A file, a folder (every ``*.parquet`` below it) or a glob. Files are read in sorted order, one
record batch at a time, so the driver's memory does not grow with the dataset.

Every file's footer and schema are checked before anything expensive starts: one corrupt,
truncated, empty or mislabelled file stops the job with an error that names it (a silently
skipped file would be a silently missing part of a nightly dataset). A file whose data pages
turn out to be corrupt while streaming stops the job the same way; what was committed stays.

Text that is not valid UTF-8 is a problem of its rows, not of the file: such columns reach the
planner as bytes (prompt, negative_prompt, id: their rows fail with a clear error) or with the
bad bytes replaced (carried columns), never as a decode error that would stop the job.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import params
from jobs.input.rows import STRING_COLUMNS
from rendering import storage

logger = logging.getLogger(__name__)
_IGNORED_SHOWN = 10  # ignored columns named in the warning; the rest are counted


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
    ignored: tuple[str, ...] = ()  # the other columns: neither read nor carried

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def open_dataset(uri: str, carry_columns: list[str]) -> InputDataset:
    """List the input's files and check each one's footer and schema."""
    fs, path = storage.filesystem(uri)
    paths = _list_files(fs, path, uri)
    files, columns, ignored = [], None, ()
    for file_path in paths:
        schema, num_rows = _read_footer(fs, file_path)
        file_columns = _check_schema(schema, carry_columns, file_path)
        if columns is None:
            columns = file_columns
            ignored = tuple(name for name in schema.names if name not in columns)
        elif set(file_columns) != set(columns):
            raise InputError(f"input file {file_path} has columns {sorted(file_columns)} but "
                             f"{paths[0]} has {sorted(columns)}: all files must share one schema")
        files.append(InputFile(file_path, num_rows))
    return InputDataset(uri, tuple(files), tuple(columns), ignored)


def signature(dataset: InputDataset) -> str:
    """What identifies the input's files as they are now: their paths, sizes and modification
    stamps (mtime, or an object store's ETag). A rerun whose input has the same signature as
    the run that completed the output has nothing to do."""
    fs, _ = storage.filesystem(dataset.uri)
    stamps = []
    for file in dataset.files:
        info = fs.info(file.path)
        stamps.append([file.path, info.get("size"),
                       *(str(info.get(k)) for k in ("mtime", "ETag", "LastModified", "etag"))])
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:32]


def warn_ignored(dataset: InputDataset) -> None:
    """Name the input columns that are neither read nor carried: a misspelled per-row column
    (``num_frame``) would otherwise leave every row at the config's default, silently. Called
    once a job's checks have passed, so that a refused job says only why."""
    if not dataset.ignored:
        return
    known = list(_expectations())
    shown = []
    for name in dataset.ignored[:_IGNORED_SHOWN]:
        close = difflib.get_close_matches(name, known, n=1)
        shown.append(f"{name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    more = len(dataset.ignored) - len(shown)
    logger.warning("input column(s) %s%s ignored: not a column reelfarm reads, and not in "
                   "input.carry_columns (list a column there to copy it into the manifest)",
                   ", ".join(shown), f" and {more} more" if more else "")


def iter_batches(dataset: InputDataset, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream the dataset's columns in file order, ``batch_rows`` rows at a time."""
    fs, _ = storage.filesystem(dataset.uri)
    for file in dataset.files:
        try:
            with fs.open(file.path, "rb") as f:
                reader = pq.ParquetFile(f)
                # One decoding thread: the driver streams, and parallel decoding of a row group
                # costs more memory than the time it saves here.
                for batch in reader.iter_batches(batch_size=batch_rows, columns=list(dataset.columns),
                                                 use_threads=False):
                    yield _with_valid_text(batch)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"input file {file.path} cannot be read ({exc}): rewrite it, or "
                             f"remove it from the input; rows already committed are kept") from exc


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
        raise InputError(f"input {uri} holds no Parquet files (*.parquet): check input.uri "
                         f"(or --input)")
    return paths


def _with_valid_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every text column that holds invalid UTF-8 made safe to turn into Python."""
    for i, (name, column) in enumerate(zip(batch.schema.names, batch.columns)):
        if not _is_string(column.type) or _valid_utf8(column):
            continue
        raw = column.cast(pa.large_binary())
        if name not in STRING_COLUMNS:
            raw = pa.array([v if v is None else v.decode("utf-8", "replace") for v in raw.to_pylist()],
                           pa.large_string())
        batch = batch.set_column(i, name, raw)
    return batch


def _valid_utf8(column: pa.Array) -> bool:
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _read_footer(fs, path: str) -> tuple[pa.Schema, int]:
    try:
        f = fs.open(path, "rb")
    except OSError as exc:
        raise InputError(f"input file {path} cannot be opened ({exc.strerror or exc}): check "
                         f"that it exists and that this user may read it") from exc
    try:
        with f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
    except (pa.ArrowException, OSError) as exc:
        if path.lower().endswith((".csv", ".tsv", ".json", ".jsonl")):
            raise InputError(f"input file {path} is not Parquet: reelfarm reads Parquet only; "
                             f"convert it, e.g. python -c \"import pandas as pd; "
                             f"pd.read_csv('{path}').to_parquet('prompts.parquet')\"") from exc
        raise InputError(f"input file {path} is not a readable Parquet file (corrupt, truncated "
                         f"or not Parquet: {exc}): rewrite it, or remove it from the input") from exc


def _expectations() -> dict:
    """Every column reelfarm reads: its name, what types it accepts, and their description."""
    expectations = {"prompt": (_is_text, "text"),
                    "id": (lambda t: _is_text(t) or pa.types.is_integer(t), "text or integers"),
                    "image": (lambda t: _is_text(t) or _is_media_struct(t),
                              "URIs, bytes or {bytes, path} structs"),
                    "video": (_is_text, "URIs or bytes")}
    expectations.update({p.name: (_is_text, "text") if p.kind is str else (_is_number, "numbers")
                         for p in params.PARAMS})
    return expectations


def _check_schema(schema: pa.Schema, carry_columns: list[str], path: str) -> tuple[str, ...]:
    names = set(schema.names)
    if "prompt" not in names:
        raise InputError(f"input file {path} has no 'prompt' column (columns: "
                         f"{', '.join(schema.names) or 'none'})")
    expectations = _expectations()
    for name, (accepts, wanted) in expectations.items():
        kind = schema.field(name).type if name in names else None
        if kind is not None and not (accepts(kind) or pa.types.is_null(kind)):
            raise InputError(f"input file {path}: column {name!r} has type {kind} but must hold "
                             f"{wanted}: fix the column, or rename it if it means something else")
    missing = [c for c in carry_columns if c not in names]
    if missing:
        raise InputError(f"input file {path} lacks the carried column(s) {', '.join(missing)} "
                         f"named in input.carry_columns")
    return tuple(c for c in schema.names if c in expectations or c in carry_columns)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_text(t: pa.DataType) -> bool:
    """Strings, bytes (decoded as UTF-8 per row), or either dictionary-encoded (categoricals)."""
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return _is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) \
        or pa.types.is_binary_view(t)


def _is_media_struct(t: pa.DataType) -> bool:
    """The struct Hugging Face datasets write for an Image feature: bytes and/or a path."""
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} <= {"bytes", "path"}


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)
