"""A committed row as a WebDataset sample: its members, checked against the manifest.

- ``{key}.json`` holds every manifest field of the row (carried columns under their own names)
  except the five that describe a run rather than the sample (``RUN_FIELDS``) and the embedding;
  ``{key}.txt`` the prompt the video was rendered from (a text stage's rewrite, else the row's
  own); ``{key}.mp4`` the video; ``{key}.clip.npy`` the video's CLIP embedding
  (``clip_embedding``: a float16 vector, ``numpy.save`` format) when it was scored; any other
  artifact ``{key}.{name}.{ext}`` (its name and its file's extension: a stage's keyframe is
  ``{key}.keyframe.png``).
- An artifact is read from its loose object or, when a ``keep_videos=False`` run already
  dropped that, from the tar's previous copy; either way its size and sha256 must match the
  manifest before it is packed.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import posixpath
import re
import tarfile
import threading

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from jobs.products.webdataset.tars import COPY_CHUNK, VIDEO, PackError, artifacts, sample_key
from rendering import storage

# Fields that describe a run, not the sample: two renders of the same row differ in them, so
# they stay out of the sample's JSON (the manifests keep them).
RUN_FIELDS = frozenset({"attempts", "render_s", "committed_at", "redo_of", "stages"})
EMBEDDING = "clip_embedding"  # the manifest column packed as {key}.clip.npy, not in the JSON
RESERVED_EXTENSIONS = frozenset({"json", "txt", "clip.npy"})
_EXT_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class Members(dict):
    """A sample's members: member name -> local path or bytes; ``video`` names the video's."""

    video: str | None = None


class Sources:
    """Where a tar's artifacts are read from: their loose objects, or, for those a
    ``keep_videos=False`` run already dropped, the tar's previous copy. Every artifact is
    checked against the manifest's size and sha256 before it is packed."""

    def __init__(self, fs, root: str, tar_path: str, tmp: str):
        self._fs, self._root, self._tar_path, self._tmp = fs, root, tar_path, tmp
        self._local = isinstance(fs, LocalFileSystem)
        self._previous: tarfile.TarFile | None = None
        self._previous_missing = False
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._previous is not None:
            self._previous.close()

    def fetch_row(self, rec: dict) -> Members:
        key = sample_key(rec["id"])
        members = Members()
        members[f"{key}.json"] = _sample_json(rec)
        # The caption is what the video was rendered from: a text stage's rewrite, if any.
        caption = rec.get("rewritten_prompt") or rec["prompt"] or ""
        members[f"{key}.txt"] = caption.encode("utf-8")
        if rec.get(EMBEDDING) is not None:
            members[f"{key}.clip.npy"] = embedding_npy(rec[EMBEDDING])
        for artifact in artifacts(rec):
            member = f"{key}.{_extension(artifact)}"
            if member in members:
                raise PackError(f"row {rec['id']!r}: two members named {member!r} (artifact "
                                f"{artifact['name']!r})")
            members[member] = self._fetch(rec, artifact, member)
            if artifact["name"] == VIDEO:
                members.video = member
        return members

    def keep_loose(self, rec: dict) -> None:
        """Put back the loose artifacts of a row this tar no longer packs (a near-duplicate)
        that a ``keep_videos=False`` run dropped, from the tar's previous copy, checked."""
        key = sample_key(rec["id"])
        for artifact in artifacts(rec):
            loose = storage.join(self._root, artifact["path"])
            if not self._fs.exists(loose):
                path = self._fetch(rec, artifact, f"{key}.{_extension(artifact)}")
                storage.with_retries(f"upload of {loose}", storage.upload_file, path, self._fs,
                                     loose)

    def _fetch(self, rec: dict, artifact: dict, member: str) -> str:
        loose = storage.join(self._root, artifact["path"])
        local = os.path.join(self._tmp, "fetch-" + member)
        if self._local:
            path = loose if os.path.exists(loose) else None
        else:
            try:
                storage.with_retries(f"download of {loose}", self._fs.get_file, loose, local)
                path = local
            except FileNotFoundError:
                path = None
        if path is None:
            path = self._from_previous(member, local)
        if path is None:
            raise PackError(f"row {rec['id']!r}: {artifact['path']} is missing and in no shard: "
                            f"`reelfarm render --redo damaged` renders it again")
        if os.path.getsize(path) != artifact["bytes"] \
                or storage.sha256_file(path) != artifact["sha256"]:
            raise PackError(f"row {rec['id']!r}: {artifact['path']} does not match its manifest "
                            f"(size or sha256): `reelfarm render --redo damaged` renders it again")
        return path

    def _from_previous(self, member: str, local: str) -> str | None:
        with self._lock:
            if self._previous is None and not self._previous_missing:
                copy = os.path.join(self._tmp, "previous.tar")
                try:
                    storage.with_retries(f"download of {self._tar_path}", self._fs.get_file,
                                         self._tar_path, copy)
                    self._previous = tarfile.open(copy, "r:")
                except FileNotFoundError:
                    self._previous_missing = True
            if self._previous is None:
                return None
            try:
                source = self._previous.extractfile(member)
            except KeyError:
                return None
            with source, open(local, "wb") as out:
                while chunk := source.read(COPY_CHUNK):
                    out.write(chunk)
            return local


def embedding_npy(values: list[float]) -> bytes:
    """A row's embedding as a ``.npy`` file's bytes (float16, shape (D,)): what ``np.load`` and
    webdataset's default decoder read."""
    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=np.float16), allow_pickle=False)
    return out.getvalue()


def _sample_json(rec: dict) -> bytes:
    fields = {k: v for k, v in rec.items() if k not in RUN_FIELDS and k != EMBEDDING}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=_json_value)
    return text.encode("utf-8")


def _json_value(value):
    """Carried columns may hold what JSON lacks: bytes (base64), dates (ISO 8601), decimals."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _extension(artifact: dict) -> str:
    """The member extension of an artifact: the video's own file extension (``mp4``), any other
    artifact its name and extension (``poster.jpg``)."""
    suffix = posixpath.splitext(artifact["path"])[1].lstrip(".").lower()
    name = _EXT_CHARS.sub("_", artifact["name"]).strip(".") or "artifact"
    ext = (suffix or name) if artifact["name"] == VIDEO else ".".join(filter(None, [name, suffix]))
    if ext in RESERVED_EXTENSIONS:
        raise PackError(f"artifact {artifact['name']!r} would be packed as .{ext}, which the "
                        f"sample's metadata uses")
    return ext
