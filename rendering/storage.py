"""Object storage through fsspec: atomic uploads, hashing, and URL joins.

An object is either complete or absent. On local disk a file is copied to a hidden temp name
beside its target and renamed into place; on object stores a single ``put_file`` only becomes
visible once the upload completes. Credentials come from the environment (for S3, the standard
AWS variables read by s3fs/botocore), never from configs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

TEMP_MARKER = ".tmp-"  # hidden temp objects contain this; verify reports any left behind
_HASH_CHUNK = 1 << 20


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for ``path`` on ``fs`` (plain paths stay plain for local disk)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def sha256_file(local_path: str) -> str:
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_object(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _local_temp_beside(path: str):
    """Yield a hidden temp path next to ``path``; rename it into place if the block succeeds."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def upload_file(local_path: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Publish ``local_path`` at ``path`` so that readers never see a partial object."""
    if isinstance(fs, LocalFileSystem):
        with _local_temp_beside(path) as temp:
            shutil.copyfile(local_path, temp)
    else:
        fs.put_file(local_path, path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object (manifest, marker, job.json) so that it is complete or absent."""
    if isinstance(fs, LocalFileSystem):
        with _local_temp_beside(path) as temp, open(temp, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
