"""Object storage through fsspec: atomic uploads, hashing, and URL joins.

An object is either complete or absent. On local disk a file is copied to a hidden temp name
beside its target and renamed into place; on object stores a single ``put_file`` only becomes
visible once the upload completes. Credentials come from the environment (for S3, the standard
AWS variables read by s3fs/botocore), never from configs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

TEMP_MARKER = ".tmp-"  # hidden temp objects contain this; verify reports any left behind
_HASH_CHUNK = 1 << 20
_HASH_RANGE = 8 << 20  # a ranged read of a listed object: one request for most videos
# Object stores throttle and blip: six tries with jittered exponential backoff ride out about
# 15 s of trouble before the caller is told (the row is retried, or the job stops cleanly).
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.5
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError)

logger = logging.getLogger(__name__)


def with_retries(what: str, fn, *args, attempts: int = RETRY_ATTEMPTS, **kwargs):
    """Call ``fn`` until it succeeds, backing off between tries; re-raise the last error."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except _PERMANENT:
            raise
        except Exception as exc:  # noqa: BLE001 - storage clients raise many transient kinds
            if attempt == attempts:
                raise
            delay = RETRY_BASE_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            logger.warning("%s failed (%s: %s); try %d of %d in %.1f s", what,
                           type(exc).__name__, exc, attempt + 1, attempts, delay)
            time.sleep(delay)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute against this process's folder; URLs as they are. Workers
    run in folders of their own (on a joined cluster, where ``ray start`` ran), so a relative
    path would name another place on each of them."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for ``path`` on ``fs`` (plain paths stay plain for local disk)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def sha256_file(local_path: str) -> str:
    return sha256_object(LocalFileSystem(), local_path)


def sha256_object(fs: fsspec.AbstractFileSystem, path: str, size: int | None = None) -> str:
    """The object's sha256. Given its ``size`` (from a listing), it is read in ranges: opening
    it as a file would ask its size first (on S3, one more request per object)."""
    digest = hashlib.sha256()
    if size is not None:
        for start in range(0, size, _HASH_RANGE):
            digest.update(fs.cat_file(path, start=start, end=min(start + _HASH_RANGE, size)))
        return digest.hexdigest()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stored_intact(fs: fsspec.AbstractFileSystem, root: str, artifacts) -> bool:
    """Whether each artifact's object (``rendering.contract.Artifact``: path under ``root``,
    bytes, sha256) still has the size and sha256 it was stored with: a receipt or a commit
    vouches only for those bytes."""
    for artifact in artifacts:
        stored = join(root, artifact.path)
        if not fs.exists(stored) or fs.size(stored) != artifact.bytes \
                or sha256_object(fs, stored) != artifact.sha256:
            return False
    return True


def temp_beside(path: str) -> str:
    """A hidden, unique temp name next to ``path`` (its folder made): what a local write goes
    to before it is renamed or linked into place."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")


def is_temp(path: str) -> bool:
    """The object is a temp one an interrupted write left (``temp_beside``'s names)."""
    return TEMP_MARKER in path.rsplit("/", 1)[-1]


@contextlib.contextmanager
def _local_temp_beside(path: str):
    """Yield a hidden temp path next to ``path``; rename it into place if the block succeeds."""
    temp = temp_beside(path)
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


def remove_temp_objects(fs: fsspec.AbstractFileSystem, root: str, folders: tuple[str, ...]) -> int:
    """Delete what interrupted writes left under ``root``: temp files and multipart uploads.

    Temp files only exist on local disk (object stores publish an upload whole), and only beside
    their targets: in ``root`` itself and in its ``folders``, listed one level deep. An object
    store is never listed: a resume over millions of objects starts at once.
    Only safe while no other job writes there, i.e. at the start of a job.
    """
    if not isinstance(fs, LocalFileSystem):
        return _abort_multipart_uploads(fs, root)
    leftovers = []
    for folder in (root, *(join(root, f) for f in folders)):
        if fs.isdir(folder):
            leftovers += [p for p in fs.ls(folder, detail=False) if is_temp(p)]
    if leftovers:
        fs.rm(leftovers)
    return len(leftovers)


def _abort_multipart_uploads(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """S3 keeps the parts of an interrupted multipart upload (invisible, but billed)."""
    if not hasattr(fs, "_call_s3"):
        return 0
    from fsspec.asyn import sync

    bucket, _, prefix = root.partition("/")
    listing = sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket,
                   Prefix=prefix.rstrip("/") + "/")
    uploads = listing.get("Uploads", [])
    for upload in uploads:
        sync(fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
             UploadId=upload["UploadId"])
    return len(uploads)


def remove_quietly(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """Remove ``path`` if it is there: gone already is as good as removed."""
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def remove_all_quietly(fs: fsspec.AbstractFileSystem, paths: list[str], what: str) -> None:
    """Delete ``paths`` in one call (a bulk request on object stores), retried; if some are
    gone already (an earlier, interrupted run took them), the rest one by one."""
    if not paths:
        return
    try:
        with_retries(f"deletion of {what}", fs.rm, paths)
    except FileNotFoundError:
        for path in paths:
            remove_quietly(fs, path)


def create_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object only where there is none (``FileExistsError`` otherwise), so that
    of two writers exactly one creates it. Local disk: a temp file beside it, hard-linked into
    place (atomic, and complete when visible); where hard links are not supported,
    ``O_CREAT | O_EXCL`` (atomic, but a reader may see it half written). S3 (s3fs): a PUT with
    ``If-None-Match: *``. Other filesystems: ``pipe_file(mode="create")``, only as safe as the
    backend makes it (fsspec's default checks, then writes)."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data, mode="create")
        return
    temp = temp_beside(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
        try:
            os.link(temp, path)  # FileExistsError if another writer created it first
        except FileExistsError:
            raise
        except OSError:  # no hard links here: exclusive create, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object (manifest, marker, job.json) so that it is complete or absent."""
    if isinstance(fs, LocalFileSystem):
        with _local_temp_beside(path) as temp, open(temp, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
