"""Clearing what interrupted writes left behind, without listing a whole object store."""

from __future__ import annotations

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from jobs.store.layout import FOLDERS
from rendering import storage


def test_local_temp_files_beside_their_targets_are_removed_and_nothing_else(tmp_path):
    kept = [tmp_path / "job.json", tmp_path / "videos" / "a.mp4", tmp_path / "notes" / ".x.tmp-1"]
    leftovers = [tmp_path / f".job.json{storage.TEMP_MARKER}1",
                 tmp_path / "videos" / f".a.mp4{storage.TEMP_MARKER}2",
                 tmp_path / "manifests" / f".shard-x{storage.TEMP_MARKER}3",
                 tmp_path / "receipts" / f".a.json{storage.TEMP_MARKER}4"]
    for path in kept + leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert storage.remove_temp_objects(LocalFileSystem(), str(tmp_path), FOLDERS) == 4
    assert all(p.exists() for p in kept) and not any(p.exists() for p in leftovers)


class _CountingMemory(MemoryFileSystem):
    """An in-memory object store that counts listings (a listing of millions costs minutes)."""

    listings = 0

    def ls(self, path, detail=True, **kwargs):
        type(self).listings += 1
        return super().ls(path, detail=detail, **kwargs)

    def find(self, path, *args, **kwargs):
        type(self).listings += 1
        return super().find(path, *args, **kwargs)


def test_an_object_store_is_never_listed(tmp_path):
    fs = _CountingMemory(skip_instance_cache=True)
    for i in range(50):
        fs.pipe_file(f"/bucket/out/videos/v{i}.mp4", b"x")
    assert storage.remove_temp_objects(fs, "/bucket/out", FOLDERS) == 0
    assert _CountingMemory.listings == 0
