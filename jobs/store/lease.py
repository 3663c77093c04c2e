"""One running driver per output: a lease that refuses a second driver and expires when its holder dies.

Without it, two drivers started on one output (a scheduler's retry while the first attempt still
runs, two people on one nightly output) both render every row. With it, the second driver is
refused at once with one line naming the holder (host, pid, since when), and a holder that died
without releasing frees the output ``ttl_s`` (plus the clock-skew margin) after its last renewal.

Protocol. The lease lives under ``<output>/_lease/`` as generation-numbered JSON objects,
``00000001.json``, ``00000002.json``, ...; the highest generation present is the lease.
- Each generation object is created with a create-only write, so exactly one writer creates it.
- Acquire: read the highest generation n. If it is live (not released, not expired), refuse. Else
  create generation n + 1; whoever creates it holds the lease, every other contender gets "exists"
  and re-reads (now finding the winner's live lease). Then list again: if a generation above ours
  exists we lost (this catches a contender whose view was so stale that it re-created a deleted
  older generation), else we hold it and delete the generations below ours.
- Renew (heartbeat thread, every ``heartbeat_s``): list; if a generation above ours exists someone
  took the output over and the lease is lost; else overwrite our own generation with a new
  ``renewed_at``/``expires_at`` and the run's ``live`` figures (what ``reelfarm status`` shows
  of a running job). Only the holder ever writes its generation after creating it, and a
  takeover writes a new generation, never ours, so a plain atomic overwrite is safe.
- Release: overwrite our generation with ``released_at`` set; the next run takes n + 1 at once.
  Only generations below a verified holder's are ever deleted, so the highest one never goes
  away and generation numbers only grow.

Clocks. Other drivers judge expiry by their wall clock against the holder's ``expires_at``, and
wait ``CLOCK_SKEW_S`` more: hosts' clocks must agree within that margin (NTP keeps them within
milliseconds). The holder judges itself by its monotonic clock: a renewal counts only if it
completes within ``ttl_s`` of the previous one, otherwise the lease is lost. So a holder that
stalled (storage unreachable, process paused) gives the lease up before anyone can take it over.
A holder that ran on this machine (same boot, same pid namespace) and whose process is gone
(SIGKILL, OOM kill) is taken over at once, without waiting for its expiry; a pid reused since
only delays that to the expiry.
The driver checks ``Lease.lost`` between shards, so at most the work in flight when a stalled
holder loses its lease overlaps with the new holder's.

Create-only writes (``storage.create_bytes``). Local disk: the record is written to a hidden temp
file beside its target and hard-linked into place (``os.link`` fails if the target exists: atomic,
and complete when visible); where hard links are not supported, ``O_CREAT | O_EXCL`` (atomic, but
a reader may see it half written; an unreadable record counts as held from its modification
time). S3 (s3fs): a PUT with ``If-None-Match: *``. Other fsspec filesystems:
``pipe_file(mode="create")``, which is only as safe as the backend makes it (fsspec's default
checks then writes: two racers could both win there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from jobs.store import layout
from rendering import storage

CLOCK_SKEW_S = 5.0  # how far hosts' wall clocks may disagree; others wait this long past expires_at
_ACQUIRE_TRIES = 5  # each lost race re-reads the winner, which then refuses us: 2 tries are typical
_UNREADABLE_TTL_S = 60.0  # a record that cannot be read counts as held this long after its mtime
_GENERATION = re.compile(r"^(\d+)\.json$")

logger = logging.getLogger(__name__)


class LeaseError(ValueError):
    """The output is held by another live run, or this run lost its hold on it."""


class Lease:
    """This run's hold on an output; renewed by a heartbeat thread until ``release()``."""

    def __init__(self, output_uri: str, fs: fsspec.AbstractFileSystem, lease_dir: str,
                 record: dict, heartbeat_s: float, renewed_mono: float):
        self.output_uri = output_uri
        self.owner: str = record["owner"]
        self.generation: int = record["generation"]
        self.ttl_s: float = record["ttl_s"]
        self.heartbeat_s = heartbeat_s
        self._fs = fs
        self._lease_dir = lease_dir
        self._record = record
        self._renewed_mono = renewed_mono  # monotonic time at which the last valid renewal began
        self.live: dict | None = None  # the run's live figures, written with each renewal
        self._lost_reason: str | None = None
        self._released = False
        self._lock = threading.Lock()  # no renewal is written after (or during) the release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="reelfarm-lease", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True once another run took the output over or the lease went unrenewed for ``ttl_s``."""
        return self.lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        if (self._lost_reason is None and not self._released
                and time.monotonic() - self._renewed_mono > self.ttl_s):
            self._lost_reason = (f"the lease went unrenewed for more than {self.ttl_s:g} s "
                                 "(storage unreachable or this process stalled)")
        return self._lost_reason

    @property
    def renewed_at(self) -> float:
        """Unix time of the last renewal written."""
        return self._record["renewed_at"]

    def check(self) -> None:
        """Raise ``LeaseError`` if the lease is lost: this run must stop writing the output."""
        if self.lost:
            raise LeaseError(f"this run lost its lease on output {self.output_uri}: "
                             f"{self.lost_reason}; stopping so that two runs never write it at once")

    def release(self) -> None:
        """Stop renewing and free the output for the next run at once. Idempotent; never raises."""
        with self._lock:
            if self._released:
                return
            lost = self.lost
            self._released = True
        self._stop.set()
        self._thread.join(timeout=30)
        if lost:
            return  # the lease is someone else's now (or may be): leave it alone
        try:
            _overwrite(self._fs, self._path(), {**self._record, "released_at": time.time()})
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
            logger.warning("could not release the lease on %s (%s: %s); it expires within %g s",
                           self.output_uri, type(exc).__name__, exc, self.ttl_s + CLOCK_SKEW_S)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _path(self) -> str:
        return _generation_path(self._lease_dir, self.generation)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and not self.lost:
            self._renew()

    def _renew(self) -> None:
        """One beat: give up if a newer generation exists, else push our expiry forward."""
        began = time.monotonic()
        try:
            newest = _generations(self._fs, self._lease_dir)
            if newest and newest[-1] > self.generation:
                self._lost_reason = _taken_over(self._fs, self._lease_dir, newest[-1])
                return
            with self._lock:
                if self._released:
                    return
                record = _stamp({**self._record, "live": self.live}, self.ttl_s)
                _overwrite(self._fs, self._path(), record)
            if not self.lost:  # a renewal that completes after the deadline does not count
                self._record, self._renewed_mono = record, began
        except Exception as exc:  # noqa: BLE001 - retried on the next beat, lost after ttl_s
            logger.warning("could not renew the lease on %s (%s: %s)", self.output_uri,
                           type(exc).__name__, exc)


def acquire(output_uri: str, ttl_s: float = 60.0, heartbeat_s: float = 10.0) -> Lease:
    """Hold ``output_uri`` for this run, or raise ``LeaseError`` naming the live run that holds it.

    1. Read the highest generation; refuse if it is live.
    2. Create the next generation with a create-only write; a lost race goes back to 1.
    3. List again; a higher generation than ours means a lost race too: back to 1.
    4. Delete the older generations and start the heartbeat.
    """
    if not (ttl_s > 0 and 0 < heartbeat_s < ttl_s):
        raise ValueError(f"lease: need 0 < heartbeat_s < ttl_s, got {heartbeat_s=} {ttl_s=}")
    output_uri = output_uri.rstrip("/")
    fs, root = storage.filesystem(output_uri)
    lease_dir = storage.join(root, layout.LEASE_DIR)
    owner = uuid.uuid4().hex
    for _ in range(_ACQUIRE_TRIES):
        # Step 1: the current lease, if any.
        generation, current = _newest(fs, lease_dir)
        if current is not None and _is_live(current):
            raise LeaseError(_busy_message(output_uri, current))
        if current is not None and current.get("released_at") is None:
            logger.info("taking over output %s from a run that is gone (host %s, pid %s)",
                        output_uri, current.get("host"), current.get("pid"))
        # Step 2: the next generation, created by exactly one contender.
        began = time.monotonic()
        record = _stamp({"owner": owner, "generation": generation + 1, "host": socket.gethostname(),
                         "pid": os.getpid(), "machine": _machine(), "started_at": time.time(),
                         "ttl_s": float(ttl_s), "released_at": None}, ttl_s)
        if not _create(fs, _generation_path(lease_dir, generation + 1), record):
            continue
        # Step 3: a contender with a stale view may have re-created a deleted generation: only
        # the highest one holds.
        present = _generations(fs, lease_dir)
        if present[-1] > generation + 1:
            _remove(fs, [_generation_path(lease_dir, generation + 1)])
            continue
        # Step 4: ours is the lease.
        _remove(fs, [_generation_path(lease_dir, g) for g in present if g <= generation])
        _remove_stale_temps(fs, lease_dir)
        return Lease(output_uri, fs, lease_dir, record, heartbeat_s, began)
    raise LeaseError(f"output {output_uri}: other reelfarm runs kept taking its lease "
                     f"({_ACQUIRE_TRIES} tries); wait for them, or stop them")


def holder(output_uri: str) -> dict | None:
    """The live lease record on ``output_uri`` (owner, host, pid, times), or None if it is free."""
    fs, root = storage.filesystem(output_uri.rstrip("/"))
    _, record = _newest(fs, storage.join(root, layout.LEASE_DIR))
    return record if record is not None and _is_live(record) else None


def _is_live(record: dict) -> bool:
    """Not released, not expired (with the clock-skew margin), and not known dead."""
    return (record.get("released_at") is None
            and time.time() <= record["expires_at"] + CLOCK_SKEW_S and not _died_here(record))


def _machine() -> str | None:
    """This boot of this machine and its pid namespace: where a pid names one process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None  # not Linux: holders are only ever judged by their expiry
    return f"{boot}/{namespace}"


def _died_here(record: dict) -> bool:
    """The holder ran in this machine's pid namespace and its process is gone."""
    pid = record.get("pid")
    if record.get("machine") is None or record.get("machine") != _machine() or type(pid) is not int:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def _stamp(record: dict, ttl_s: float) -> dict:
    now = time.time()
    return {**record, "renewed_at": now, "expires_at": now + ttl_s}


def _busy_message(output_uri: str, record: dict) -> str:
    now = time.time()
    seen = max(0, round(now - record["renewed_at"]))
    frees = max(1, math.ceil(record["expires_at"] + CLOCK_SKEW_S - now))
    return (f"output {output_uri} is in use by another reelfarm run (host {record.get('host')}, "
            f"pid {record.get('pid')}, since {_utc(record.get('started_at'))}, last seen {seen} s "
            f"ago): wait for it, or stop it; a run that died frees the output within {frees} s")


def _taken_over(fs: fsspec.AbstractFileSystem, lease_dir: str, generation: int) -> str:
    try:
        record = _read(fs, _generation_path(lease_dir, generation))
        who = f"host {record.get('host')}, pid {record.get('pid')}"
    except Exception:  # noqa: BLE001 - the reason is informative only
        who = "host unknown"
    return f"another run ({who}) took the output over after this run's lease expired"


def _utc(t: float | None) -> str:
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _generation_path(lease_dir: str, generation: int) -> str:
    return storage.join(lease_dir, f"{generation:08d}.json")


def _generations(fs: fsspec.AbstractFileSystem, lease_dir: str) -> list[int]:
    """The generations present, ascending (temp files and other names are ignored)."""
    fs.invalidate_cache(lease_dir)  # s3fs caches listings; the lease needs the live one
    try:
        names = storage.with_retries("listing the lease", fs.ls, lease_dir, detail=False)
    except FileNotFoundError:
        return []
    found = (_GENERATION.match(name.rstrip("/").rsplit("/", 1)[-1]) for name in names)
    return sorted(int(m.group(1)) for m in found if m)


def _newest(fs: fsspec.AbstractFileSystem, lease_dir: str) -> tuple[int, dict | None]:
    """The highest generation and its record: (0, None) when there is none yet."""
    for _ in range(3):  # a generation can vanish between list and read (a loser cleaning up)
        generations = _generations(fs, lease_dir)
        if not generations:
            return 0, None
        path = _generation_path(lease_dir, generations[-1])
        try:
            return generations[-1], _read(fs, path)
        except FileNotFoundError:
            continue
    return generations[-1], _read(fs, path)


def _read(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """A lease record; one that cannot be parsed (half written) counts as held since its mtime."""
    data = storage.with_retries("reading the lease", fs.cat_file, path)
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if isinstance(record, dict) and all(isinstance(record.get(k), (int, float))
                                        for k in ("started_at", "renewed_at", "expires_at")):
        return record
    try:
        since = fs.modified(path).timestamp()
    except Exception:  # noqa: BLE001 - no modification time: count it as long expired
        since = 0.0
    return {"host": "unknown", "pid": "unknown", "started_at": since, "renewed_at": since,
            "expires_at": since + _UNREADABLE_TTL_S, "released_at": None}


def _create(fs: fsspec.AbstractFileSystem, path: str, record: dict) -> bool:
    """Create ``path`` only if absent; True when ours is the object there afterwards."""
    data = json.dumps(record, sort_keys=True).encode()
    try:
        storage.create_bytes(fs, path, data)
        return True
    except Exception as exc:  # noqa: BLE001 - decided by what is there now
        # A write may land and still report an error (a retried PUT then sees its own object):
        # whoever's record is there holds this generation.
        try:
            there = json.loads(storage.with_retries("reading the lease", fs.cat_file, path))
        except FileNotFoundError:  # "exists" then gone: a stale generation, cleaned up since
            if isinstance(exc, FileExistsError):
                return False
            raise exc from None
        except ValueError:  # half written by a contender on a non-atomic filesystem
            return False
        return isinstance(there, dict) and there.get("owner") == record["owner"]


def _remove_stale_temps(fs: fsspec.AbstractFileSystem, lease_dir: str) -> None:
    """Delete temp files a killed contender left (``verify`` reports them); local disk only.

    A contender's temp file lives for microseconds, so one older than a minute is abandoned.
    """
    if not isinstance(fs, LocalFileSystem):
        return
    cutoff = time.time() - 60
    with contextlib.suppress(OSError), os.scandir(lease_dir) as entries:
        for entry in entries:
            if storage.is_temp(entry.name) and entry.stat().st_mtime < cutoff:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _overwrite(fs: fsspec.AbstractFileSystem, path: str, record: dict) -> None:
    storage.write_bytes(fs, path, json.dumps(record, sort_keys=True).encode())


def _remove(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete old generations, best effort: leftovers are harmless (only the highest counts)."""
    for path in paths:
        try:
            fs.rm_file(path)
        except Exception as exc:  # noqa: BLE001
            logger.debug("could not delete old lease generation %s: %s", path, exc)
