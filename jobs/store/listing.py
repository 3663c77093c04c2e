"""What an output's artifact folders hold, listed a page at a time and kept as 8-byte hashes.

The folders are flat and may hold millions of objects: a listing held whole (``fs.ls`` with
its details) took 1 GB at a million videos. Here each page is hashed and dropped, so memory is
16 bytes an object (its path, and its path with its size) whatever the folder holds; on S3 a
page is one LIST request of 1,000 keys.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from jobs.store import layout
from jobs.store.hashset import HashSet
from rendering import storage

CHUNK = 65536  # listed objects hashed and taken in at a time
_LOCAL_PAGE = 1000  # a local page: the size of an S3 one


def pages(fs, folder: str) -> Iterator[list[tuple[str, int | None]]]:
    """(path, bytes) of each entry directly in ``folder``, a page at a time; bytes None for a
    subfolder. On S3 each page is a LIST request; on local disk a directory scan read as it
    goes; on any other filesystem the folder's listing, in one page."""
    if isinstance(fs, LocalFileSystem):
        yield from _local_pages(folder)
    elif hasattr(fs, "call_s3"):
        yield from _s3_pages(fs, folder)
    else:
        entries = fs.ls(folder, detail=True, refresh=True)
        fs.invalidate_cache(folder)
        yield [(o["name"], None if o["type"] == "directory" else o["size"]) for o in entries]


def _local_pages(folder: str) -> Iterator[list[tuple[str, int | None]]]:
    """A file's size is a stat, most of a local listing's time: each is asked of the folder
    opened once (``fstatat``), not of its path from the root, which is a sixth faster."""
    prefix = folder.rstrip("/") + "/"
    opened = os.open(folder, os.O_RDONLY) if os.scandir in os.supports_fd else None
    try:
        with os.scandir(folder if opened is None else opened) as entries:
            while batch := list(itertools.islice(entries, _LOCAL_PAGE)):
                try:
                    yield [(prefix + e.name, None if e.is_dir() else e.stat().st_size)
                           for e in batch]
                except FileNotFoundError:  # an entry removed since the scan read it: left out
                    yield [entry for entry in (_entry(prefix, e) for e in batch) if entry]
    finally:
        if opened is not None:
            os.close(opened)


def _entry(prefix: str, entry: os.DirEntry) -> tuple[str, int | None] | None:
    try:
        return prefix + entry.name, None if entry.is_dir() else entry.stat().st_size
    except FileNotFoundError:  # removed since the scan read its name, or a broken link
        return None


def _s3_pages(fs, folder: str) -> Iterator[list[tuple[str, int | None]]]:
    bucket, key, _ = fs.split_path(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield [*((f"{bucket}/{p['Prefix'].rstrip('/')}", None)
                 for p in page.get("CommonPrefixes", [])),
               *((f"{bucket}/{o['Key']}", o["Size"]) for o in page.get("Contents", [])
                 if o["Key"] != prefix)]  # a folder's marker object, not an object in it
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def path_hashes(paths) -> np.ndarray:
    """64-bit hashes of paths, for looking them up in a listing: Python's own string hash, the
    same for a path within a process (where a listing is made and looked in), and a C call
    where a digest (``key_hashes``) took most of the time of hashing ten million paths."""
    paths = list(paths)
    return np.fromiter(map(hash, paths), dtype=np.int64, count=len(paths)).view(np.uint64)


def sized_hashes(hashes: np.ndarray, sizes) -> np.ndarray:
    """The hash of each (path, bytes), from its path's: the path's hash with the size mixed in
    (splitmix64, a bijection, so two sizes of one path never meet): one string hashed per
    object, not two. A size not known (None) matches none listed."""
    z = np.array([-1 if size is None else size for size in sizes], dtype=np.int64) \
        if isinstance(sizes, list) else np.asarray(sizes, dtype=np.int64)
    z = z.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return hashes ^ z ^ (z >> np.uint64(31))


class Listing:
    """One listing of each folder artifacts are stored in (``FOLDERS``, and each stage's under
    ``stages/``): which objects exist, and at which sizes, as hashes (``shown``); and, given the
    hashes of every path the manifests list, the objects none does (``strays``)."""

    FOLDERS = (layout.VIDEOS_DIR, layout.PREVIEWS_DIR, layout.STAGES_DIR)

    def __init__(self, fs, root: str):
        self.fs = fs
        try:  # refresh: what this process listed before may have changed since
            self.entries = fs.ls(root, detail=False, refresh=True)  # the output's own
        except FileNotFoundError:
            self.entries = []
        fs.invalidate_cache(root)  # nor is what it lists now kept, to be stale later
        sized: list[np.ndarray] = []  # hashes of (path, bytes) of every object listed
        self.folders: dict[str, HashSet] = {}  # each folder listed: hashes of its objects' paths
        self.temps: list[str] = []  # temp objects an interrupted write left in them
        self._videos, self._previews, self._stages = (storage.join(root, name)
                                                      for name in self.FOLDERS)
        present = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.entries}
        for name in self.FOLDERS:
            subfolders = self._add(storage.join(root, name), sized) if name in present else []
            for stage in subfolders if name == layout.STAGES_DIR else ():
                self._add(stage, sized)
        self.sized = HashSet.of(sized)  # whole before it is looked in: one sorted run

    def _add(self, folder: str, sized: list[np.ndarray]) -> list[str]:
        """Take in the objects of ``folder``, hashed a chunk at a time (their sized hashes into
        ``sized``); return its subfolders."""
        members: list[np.ndarray] = []
        subfolders, files = [], []
        for page in pages(self.fs, folder):
            files += [(path, size) for path, size in page if size is not None]
            subfolders += [path for path, size in page if size is None]
            if len(files) >= CHUNK:
                self._take(files, members, sized)
                files = []
        self._take(files, members, sized)
        self.folders[folder] = HashSet.of(members)
        return subfolders

    def _take(self, files: list[tuple[str, int]], members: list[np.ndarray],
              sized: list[np.ndarray]) -> None:
        hashes = path_hashes(path for path, _ in files)
        members.append(hashes)
        sized.append(sized_hashes(hashes, [size for _, size in files]))
        self.temps += [path for path, _ in files if storage.is_temp(path)]

    def at_size(self, hashes: np.ndarray, sizes) -> np.ndarray:
        """Which objects (``path_hashes`` of their paths, and their bytes) the listing shows at
        that size: for most of an output, all there is to know."""
        return self.sized.contains(sized_hashes(hashes, sizes))

    def shown(self, paths: list[str], sizes: list[int | None]) -> list[bool | None]:
        """For each object (its path and bytes): True when the listing shows it at that size,
        False when it shows none at that path; None when it cannot tell, where the object has
        another size (then asking its size says which) or is outside the folders listed."""
        hashes = path_hashes(paths)
        named = np.zeros(len(paths), dtype=bool)
        for members in self.folders.values():
            named |= members.contains(hashes)
        return [True if at_size else None if there or not self._covers(path) else False
                for path, at_size, there in zip(paths, self.at_size(hashes, sizes).tolist(),
                                                named.tolist())]

    def _covers(self, path: str) -> bool:
        """An object at ``path`` would be in the listing: it is directly in a folder listed, or
        in a stage's (each one under ``stages/`` was listed). A row's artifact may be anywhere
        under the output (its path is the manifest's word): one elsewhere is asked for itself,
        one request each, rather than listing all the output holds for it."""
        folder = path.rsplit("/", 1)[0]
        return folder in (self._videos, self._previews, self._stages) \
            or folder.rsplit("/", 1)[0] == self._stages

    def strays(self, listed: HashSet) -> Iterator[tuple[str, str]]:
        """(what, path) of each object listed in ``videos/`` or a stage's folder whose path is
        not in ``listed`` (temp objects aside: ``temps``). An unlisted preview is not one.

        Only the hashes were kept: a folder that holds any such object is listed again for
        their names (on S3, its LIST requests again), and an object stored since the first
        listing is not taken for one."""
        temps = path_hashes(self.temps)
        for folder, members in self.folders.items():
            if folder == self._previews:
                continue
            unknown = sum(int((~listed.contains(run[start:start + CHUNK], presorted=True)).sum())
                          for run in members.runs() for start in range(0, len(run), CHUNK))
            if unknown == int((~listed.contains(temps) & members.contains(temps)).sum()):
                continue  # every object is listed, or a temp one
            what = "video" if folder == self._videos else "object"
            for page in pages(self.fs, folder):
                names = [path for path, size in page
                         if size is not None and not storage.is_temp(path)]
                hashes = path_hashes(names)
                found = members.contains(hashes) & ~listed.contains(hashes)
                yield from ((what, path) for path, stray in zip(names, found.tolist()) if stray)
