"""Checks on ``output.uri`` made before anything is planned or rendered (``plan`` and ``render``
share them), so a wrong output fails in one line that names the real problem."""

from __future__ import annotations

import posixpath

from fsspec.implementations.local import LocalFileSystem

from jobs.store.job_file import OutputError
from rendering import storage


def check_output_is_folder(output_uri: str) -> None:
    """Refuse an output that is a regular file, or on local disk lies under one: reelfarm
    writes a folder there (otherwise the first write fails, and seems a permission problem)."""
    fs, root = storage.filesystem(output_uri)
    path = root.rstrip("/") or root
    if fs.isfile(path):
        raise OutputError(f"output {output_uri} is a file, not a folder: choose another "
                          f"output.uri (or --output)")
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        while parent and parent != path and not fs.exists(parent):
            path, parent = parent, posixpath.dirname(parent)
        if parent and parent != path and fs.isfile(parent):
            raise OutputError(f"output {output_uri} is inside {parent}, which is a file, not a "
                              f"folder: choose another output.uri (or --output)")
