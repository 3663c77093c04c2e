"""The output lease on real filesystems (local disk and a moto S3 server on 127.0.0.1): a second
driver is refused while the first lives, a dead one's lease expires and is taken over by exactly
one contender, and a heartbeat keeps a live one held past its ttl."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid

import pytest
from helpers import REPO

from jobs.store import layout, lease
from jobs.store.lease import LeaseError, acquire
from rendering import storage

@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    """A fresh output URI on local disk or on S3."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{uuid.uuid4().hex}/out"


def _plant(output: str, generation: int, age_s: float = 1000.0, ttl_s: float = 60.0) -> None:
    """Leave the lease of a run on host deadhost, pid 4242, that last renewed ``age_s`` ago."""
    fs, root = storage.filesystem(output)
    renewed = time.time() - age_s
    record = {"owner": "dead", "generation": generation, "host": "deadhost", "pid": 4242,
              "started_at": renewed - 100, "renewed_at": renewed, "expires_at": renewed + ttl_s,
              "ttl_s": ttl_s, "released_at": None}
    storage.write_bytes(fs, storage.join(root, layout.LEASE_DIR, f"{generation:08d}.json"),
                        json.dumps(record).encode())


def _generations(output: str) -> list[int]:
    fs, root = storage.filesystem(output)
    return lease._generations(fs, storage.join(root, layout.LEASE_DIR))


def test_a_second_driver_is_refused_with_one_line_naming_the_holder(output):
    with acquire(output) as held:
        with pytest.raises(LeaseError) as refused:
            acquire(output)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"output {output} is in use by another reelfarm run (host "
                                  f"{socket.gethostname()}, pid ")
        assert f"pid {os.getpid()}, since " in message
        assert re.search(r" UTC, last seen \d s ago\): wait for it, or stop it; a run that died "
                         r"frees the output within 6\d s$", message)  # ttl 60 s + 5 s clock skew
        assert lease.holder(output)["owner"] == held.owner


def test_release_frees_the_output_at_once_and_is_idempotent(output):
    first = acquire(output)
    first.release()
    first.release()
    assert lease.holder(output) is None and not first.lost
    with acquire(output) as second:
        assert second.generation == first.generation + 1
        assert _generations(output) == [second.generation]  # the older generation is gone
    assert not first._thread.is_alive() and not second._thread.is_alive()


def test_the_context_manager_releases_on_an_exception(output):
    with pytest.raises(RuntimeError), acquire(output):
        raise RuntimeError("render failed")
    acquire(output).release()


def test_a_dead_runs_lease_expires_and_is_taken_over(output):
    _plant(output, 1, age_s=1000)
    with acquire(output) as held:
        assert held.generation == 2 and _generations(output) == [2]
    _plant(output, 3, age_s=0)  # a live one is not
    with pytest.raises(LeaseError, match=r"host deadhost, pid 4242, .* last seen \d s ago"):
        acquire(output)


@pytest.mark.parametrize("before", ["fresh", "expired"])
def test_of_racing_contenders_exactly_one_wins(output, before):
    contenders = 4
    for round_ in range(4):
        target = f"{output}/{round_}"
        if before == "expired":
            _plant(target, 7, age_s=1000)
        barrier = threading.Barrier(contenders)
        won, refused, failed = [], [], []

        def contend():
            barrier.wait()
            try:
                won.append(acquire(target))
            except LeaseError as exc:
                refused.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        threads = [threading.Thread(target=contend) for _ in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failed
        assert len(won) == 1 and len(refused) == contenders - 1
        assert all("is in use by another reelfarm run" in m for m in refused)
        assert _generations(target) == [won[0].generation]
        won[0].release()


def test_a_contender_with_a_stale_view_cannot_win(output, monkeypatch):
    for _ in range(2):
        acquire(output).release()
    held = acquire(output)  # generation 3; generations 1 and 2 are deleted
    assert _generations(output) == [3]
    stale = iter([(1, {"host": "deadhost", "pid": 4242, "started_at": 0.0, "renewed_at": 0.0,
                       "expires_at": 60.0, "released_at": None})])
    real = lease._newest
    monkeypatch.setattr(lease, "_newest", lambda fs, d: next(stale, None) or real(fs, d))
    with pytest.raises(LeaseError, match="is in use"):
        acquire(output)  # re-creates generation 2, sees 3 above it, backs off and is refused
    assert _generations(output) == [3] and not held.lost
    held.release()


def test_the_heartbeat_keeps_a_lease_past_its_ttl(output, monkeypatch):
    monkeypatch.setattr(lease, "CLOCK_SKEW_S", 0.0)
    with acquire(output, ttl_s=1.5, heartbeat_s=0.1) as held:
        first = lease.holder(output)["renewed_at"]
        time.sleep(2.0)
        assert not held.lost
        current = lease.holder(output)
        assert current is not None and current["renewed_at"] > first + 1.0
        with pytest.raises(LeaseError, match="is in use"):
            acquire(output, ttl_s=1.5, heartbeat_s=0.1)


def test_a_holder_learns_that_another_run_took_the_output_over(output):
    held = acquire(output, ttl_s=10.0, heartbeat_s=0.1)
    _plant(output, held.generation + 1, age_s=0)  # as if another run took over after a stall
    deadline = time.monotonic() + 5
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost and "host deadhost, pid 4242" in held.lost_reason
    with pytest.raises(LeaseError, match="lost its lease"):
        held.check()
    held.release()  # leaves the new holder's lease alone
    assert lease.holder(output)["host"] == "deadhost"


def test_a_lease_that_cannot_be_renewed_is_lost_after_its_ttl(tmp_path, monkeypatch):
    held = acquire(str(tmp_path), ttl_s=0.5, heartbeat_s=0.1)
    held.check()

    def unreachable(*args):
        raise OSError("storage unreachable")

    monkeypatch.setattr(lease, "_overwrite", unreachable)
    time.sleep(0.8)
    assert held.lost and "unrenewed for more than 0.5 s" in held.lost_reason
    held.release()


def test_the_heartbeat_must_be_shorter_than_the_ttl(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_s < ttl_s"):
        acquire(str(tmp_path), ttl_s=5, heartbeat_s=5)


def test_a_killed_contenders_temp_file_is_cleaned_up(tmp_path):
    lease_dir = tmp_path / layout.LEASE_DIR
    lease_dir.mkdir()
    abandoned = lease_dir / f".00000001.json{storage.TEMP_MARKER}dead"
    recent = lease_dir / f".00000001.json{storage.TEMP_MARKER}live"
    abandoned.write_text("{")
    recent.write_text("{")
    os.utime(abandoned, (time.time() - 120, time.time() - 120))
    acquire(str(tmp_path)).release()
    assert not abandoned.exists() and recent.exists()  # a live contender's is left alone


_HOLD = """
import sys, time
from jobs.store.lease import acquire
held = acquire(sys.argv[1], ttl_s=float(sys.argv[2]), heartbeat_s=0.1)
print("held", flush=True)
while not held.lost:
    time.sleep(0.02)
print("lost:", held.lost_reason, flush=True)
"""


def _holder_process(output: str, ttl_s: float):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", _HOLD, output, str(ttl_s)],
                               cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_killed_driver_on_this_machine_frees_the_output_at_once(tmp_path):
    import signal

    output = str(tmp_path / "out")
    driver = _holder_process(output, ttl_s=60)
    try:
        with pytest.raises(LeaseError, match=rf"pid {driver.pid}, since "):
            acquire(output)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    with acquire(output) as held:  # no 60 s wait: its process is gone
        assert held.generation == 2


def test_a_stalled_driver_is_taken_over_after_its_ttl_and_learns_it_lost(tmp_path, monkeypatch):
    import signal

    monkeypatch.setattr(lease, "CLOCK_SKEW_S", 0.0)
    output = str(tmp_path / "out")
    driver = _holder_process(output, ttl_s=1.0)
    try:
        driver.send_signal(signal.SIGSTOP)  # alive but silent, like a paused VM
        started = time.monotonic()
        while True:
            try:
                held = acquire(output)
                break
            except LeaseError:
                assert time.monotonic() - started < 5, "a silent driver's lease never expired"
                time.sleep(0.1)
        assert time.monotonic() - started > 0.5  # not before its ttl
        driver.send_signal(signal.SIGCONT)
        assert driver.stdout.readline().startswith("lost: ")
        assert driver.wait(10) == 0
        assert not held.lost and lease.holder(output)["owner"] == held.owner
        held.release()
    finally:
        driver.kill()
        driver.wait(10)


def test_the_runs_live_figures_are_written_with_each_renewal(tmp_path):
    output = str(tmp_path / "out")
    with acquire(output, ttl_s=1.5, heartbeat_s=0.1) as held:
        assert lease.holder(output).get("live") is None
        held.live = {"committed": 3, "to_do": 10}
        time.sleep(0.5)
        assert lease.holder(output)["live"] == {"committed": 3, "to_do": 10}
        assert 0 <= time.time() - held.renewed_at < 0.5
    assert lease.holder(output) is None  # released: no run holds it, whatever it last said
