"""Where the output is: checks on ``output.uri`` made before anything is planned or rendered
(``plan`` and ``render`` share them), and the probes that prove every worker stores where the
driver reads, so a wrong output fails in one line that names the real problem."""

from __future__ import annotations

import posixpath

from fsspec.implementations.local import LocalFileSystem

from jobs.store import layout
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


def check_probes(output_uri: str, infos: list[list[dict]]) -> None:
    """Read back the object every worker stored at start (``infos``: what each pool's workers
    said when they loaded): a worker that stores where this driver cannot read (a local path
    on another machine, memory://) would write a whole job nowhere the manifests point."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache()
    for info in (worker for pool in infos for worker in pool):
        probe = info.get("probe")  # None: a stand-in renderer (benchmarks) stores none
        if not probe:
            continue
        if not fs.exists(storage.join(root, probe)):
            raise OutputError(
                f"output {output_uri}: a worker (pid {info['pid']}) stored a test object there "
                f"that this driver cannot read back: the workers do not share this storage with "
                f"the driver. Use an object-store URI (s3://, gs://, ...) or a folder mounted at "
                f"the same path on every node")
        storage.remove_quietly(fs, storage.join(root, probe))  # others may be loading now


def remove_probes(output_uri: str) -> None:
    """Whatever probes are left at the end of a run (a worker that never finished loading)."""
    fs, root = storage.filesystem(output_uri)
    storage.remove_quietly(fs, storage.join(root, layout.PROBES_DIR), recursive=True)
