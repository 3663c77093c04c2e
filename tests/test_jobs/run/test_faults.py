"""Fault injection on real parts: killed drivers and workers, hung workers, poison rows,
uploads that break half way. Nothing committed is lost or rendered twice."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import psutil
import pytest
from helpers import prompts, run_cli, stages_config, stored, tiny_config, write_prompts
from helpers import CliDriver, by_id, committed_shards, read_manifest, wait_for, write_config
from helpers import render_actor_pids

from jobs.store import manifest
from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render
from rendering import storage

pytestmark = pytest.mark.slow  # minutes: whole jobs and processes


def _committed(out) -> int:
    return len(committed_shards(out))


def test_an_exception_in_the_middle_of_an_upload_leaves_nothing_visible(tmp_path, monkeypatch):
    source = tmp_path / "video.mp4"
    source.write_bytes(b"x" * 100_000)
    target = tmp_path / "out" / "videos" / "clip.mp4"

    def copy_half_then_fail(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(50_000))
        raise OSError("connection reset half way")

    monkeypatch.setattr(storage.shutil, "copyfile", copy_half_then_fail)
    fs, path = storage.filesystem(str(target))
    with pytest.raises(OSError, match="half way"):
        storage.upload_file(str(source), fs, path)
    assert os.listdir(target.parent) == []  # neither the video nor its temp file


def test_sigkill_of_the_driver_then_rerun_renders_only_what_was_not_committed(tmp_path):
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(24))
    # WebDataset shards of 5 rows are packed as the job runs: they too must come out whole.
    # Committed shards are folded into segments two at a time, as the job runs and at resume.
    config = write_config(tmp_path, tiny_config(src, str(out), output={
        "shard_size": 2, "segment_shards": 2, "webdataset": {"rows_per_shard": 5}}))
    _sigkill_driver(config, lambda: _committed(out) >= 3, "three committed shards")
    committed = by_id(read_manifest(out, shards=True))
    mtimes = {i: os.path.getmtime(stored(out, r)) for i, r in committed.items()}
    assert len(committed) >= 6

    started = time.monotonic()
    result = run_cli("render", str(config), "--quiet")
    rerun_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(24)]
    assert all(r["status"] == "ok" for r in rows)
    for row_id, mtime in mtimes.items():  # committed videos were not rendered again
        assert os.path.getmtime(stored(out, committed[row_id])) == mtime
    assert f"; {len(committed)} row(s) were already done" in result.stdout
    assert run_cli("verify", str(out)).returncode == 0  # the shards' check included
    assert _packed_ids(out) == sorted(r["id"] for r in rows)  # every row once, in 5 shards
    listed = manifest.committed(str(out))
    assert len(listed.checkpoint["segments"]) >= 5 and len(listed.shards) < 2
    job = json.loads((out / "job.json").read_text())["last_run"]
    print(f"driver SIGKILL: {len(committed)} rows committed before the kill; the rerun took "
          f"{rerun_s:.1f} s, rendered {job['rendered']} and recovered {job['recovered']} from receipts")


def _sigkill_driver(config, until, what: str, at_kill=lambda: None):
    """Run ``reelfarm render config`` until ``until()``, then SIGKILL it; what ``at_kill()``
    saw just before the kill. (Its local Ray cluster goes with the ``with``.)"""
    with CliDriver("render", str(config), "--quiet") as driver:
        wait_for(until, 180, what, driver)
        seen = at_kill()
        driver.kill_hard()
    return seen


def _packed_ids(out) -> list[str]:
    """The row ids in the output's WebDataset shards, read back with the webdataset library."""
    import webdataset as wds

    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return sorted(json.loads(s["json"])["id"] for s in wds.WebDataset(tars, shardshuffle=False))


def _render_in_background(cfg):
    outcome = {}

    def run():
        try:
            outcome["summary"] = render(cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_a_dead_or_hung_worker_is_replaced_and_its_shard_done_elsewhere(tmp_path, ray_local, fault):
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(32))
    cfg = validate(tiny_config(src, str(out), output={"shard_size": 2, "webdataset": True},
                               render={"num_inference_steps": 6, "batch_size": 1},
                               cluster={"shard_timeout_s": 15 if fault == "hang" else 120}))
    thread, outcome = _render_in_background(cfg)
    wait_for(lambda: _committed(out) >= 1, 120, "a committed shard")
    victim = psutil.Process(render_actor_pids(os.getpid())[0])
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)
    thread.join(300)
    assert not thread.is_alive(), "the job did not finish"
    if psutil.pid_exists(victim.pid):  # Ray dropped a stopped worker but cannot reap it
        os.kill(victim.pid, signal.SIGKILL)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert (summary.ok, summary.failed) == (32, 0)
    rows = read_manifest(out)
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(32)]
    # A hung worker's shard is done elsewhere either after shard_timeout_s, or sooner, by a
    # backup copy an idle worker takes at the tail (the hung worker is then stopped, with no
    # row's attempt spent).
    capacity = json.loads((out / "job.json").read_text())["last_run"].get("capacity", {})
    if not capacity.get("backups_first"):
        assert summary.workers_replaced >= 1
        assert max(r["attempts"] for r in rows) >= 2  # the lost shard's rows were tried again
    else:
        assert fault == "hang" and {r["attempts"] for r in rows} == {1}
    assert verify(str(out)).problems == []  # the WebDataset shard's check included
    assert _packed_ids(out) == [f"row-{i:03d}" for i in range(32)]
    print(f"worker {fault}: job finished {time.monotonic() - started:.1f} s after the fault")


def test_a_poison_row_fails_alone_and_the_job_exits_3(tmp_path):
    """DDIM refuses more steps than its 1,000 training timesteps: a row asking for 1,001 passes
    reelfarm's checks (the limit is raised here) and is refused by the pipeline every time."""
    rows = [{**row, "num_inference_steps": None} for row in prompts(5)]
    rows[2]["num_inference_steps"] = 1001
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    config = write_config(tmp_path, tiny_config(
        src, str(tmp_path / "out"), limits={"max_inference_steps": 2000},
        cluster={"backend": "inline"}))
    result = run_cli("render", str(config), "--quiet")
    assert result.returncode == 3, result.stderr
    rows = by_id(read_manifest(tmp_path / "out"))
    assert rows["row-002"]["status"] == "failed"
    assert rows["row-002"]["error_code"] == "render_error"
    assert "1001 cannot be larger than" in rows["row-002"]["error"]
    assert all(r["status"] == "ok" for i, r in rows.items() if i != "row-002")
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0


def test_videos_stored_before_a_crash_are_committed_without_rendering_them_again(tmp_path):
    """A worker stored four videos, then everything died before the shard was committed."""
    from jobs.input.dataset import open_dataset
    from jobs.run.workers import worker_spec
    from jobs.store.hashset import HashSet
    from jobs.input.plan import PlanCounts, plan_rows
    from rendering.worker import ShardRenderer

    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(6))
    cfg = validate(tiny_config(src, str(out), cluster={"backend": "inline"}))
    planned = list(plan_rows(open_dataset(src, []), cfg, HashSet(), PlanCounts()))
    early = ShardRenderer(worker_spec(cfg)).render_shard([p.outcome for p in planned[:4]])
    assert all(r.ok for r in early) and len(list((out / "receipts").iterdir())) == 4
    with open(out / early[3].artifact("video").path, "r+b") as f:  # one stored video was damaged since
        f.seek(200)
        f.write(b"\xde\xad")
    mtimes = {r.id: os.path.getmtime(out / r.artifact("video").path) for r in early[:3]}

    summary = render(cfg, progress=False)
    assert (summary.recovered, summary.rendered, summary.ok) == (3, 3, 6)
    assert {r.id: os.path.getmtime(out / r.artifact("video").path) for r in early[:3]} == mtimes
    assert not (out / "receipts").exists()
    assert verify(str(out)).problems == []


def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(24))
    config = write_config(tmp_path, tiny_config(src, str(out), output={"shard_size": 2},
                                                render={"num_inference_steps": 6}))
    with CliDriver("render", str(config), "--quiet") as driver:
        wait_for(lambda: _committed(out) >= 2, 180, "two committed shards", driver)
        _, stderr = driver.stop(signal.SIGTERM)
    assert driver.returncode == 1
    assert "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    job = json.loads((out / "job.json").read_text())
    assert job["last_run"]["status"] == "interrupted"
    committed_before = job["counts"]["committed"]
    assert 4 <= committed_before < 24

    result = run_cli("render", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"{committed_before} row(s) were already done" in result.stdout
    assert [r["status"] for r in read_manifest(out)] == ["ok"] * 24


def test_sigterm_while_the_cluster_and_workers_start_is_a_clean_stop_too(tmp_path):
    """The driver waits in Ray's own calls while the cluster starts and the workers load: a
    signal handler's exception raised there came back as a SystemError (or, during ray.init, as
    Ray's exit 15), recorded as a failed run."""
    out = tmp_path / "out"
    config = write_config(tmp_path, rows=prompts(4))
    for delay_s in (0.5, 3.0):  # in ray.init, then while the workers start
        with CliDriver("render", str(config)) as driver:
            wait_for(lambda: (out / "job.json").exists(), 60, "the run to start", driver)
            time.sleep(delay_s)
            _, stderr = driver.stop(signal.SIGTERM)
        assert driver.returncode == 1, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == (
            "reelfarm: interrupted; committed work is kept: rerun the same command to resume")
        assert json.loads((out / "job.json").read_text())["last_run"]["status"] == "interrupted"
        (out / "job.json").unlink()


# --- multi-stage jobs ----------------------------------------------------------------------


def _stage_pids(records) -> dict[str, list[int]]:
    """Each stage's worker pids, from the driver's start-up log lines."""
    pids = {}
    for record in records:
        found = re.match(r"(\w+): \d+ worker\(s\) on .* pid\(s\) ([\d ]+)$", record.getMessage())
        if found:
            pids[found.group(1)] = [int(p) for p in found.group(2).split()]
    return pids


@pytest.mark.parametrize("stage", ["keyframe", "video"])
def test_a_worker_killed_in_either_stage_costs_only_that_stages_rows_in_flight(
        tmp_path, ray_local, caplog, stage):
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(24))
    cfg = validate(stages_config(src, str(out), output={"shard_size": 2},
                                 render={"num_inference_steps": 4}))
    caplog.set_level(logging.INFO, logger="jobs.run.workers")
    thread, outcome = _render_in_background(cfg)
    wait_for(lambda: _committed(out) >= 1, 120, "a committed shard")
    os.kill(_stage_pids(caplog.records)[stage][0], signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive(), "the job did not finish"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert (summary.ok, summary.failed) == (24, 0) and summary.workers_replaced >= 1
    rows = read_manifest(out)
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(24)]
    redone = {name: sum(s["attempts"] - 1 for r in rows for s in r["stages"] if s["name"] == name)
              for name in ("keyframe", "video")}
    assert redone[stage] >= 1  # the lost shard's rows were tried again, in that stage only
    assert redone["video" if stage == "keyframe" else "keyframe"] == 0
    assert verify(str(out)).problems == []
    print(f"worker SIGKILL in the {stage} stage: rows re-done per stage {redone}")


def test_sigkill_of_the_driver_between_stages_keeps_every_stored_keyframe(tmp_path):
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(24))
    # A slow video stage: keyframes wait for it, stored but not yet animated.
    config = write_config(tmp_path, stages_config(
        src, str(out), output={"shard_size": 2},
        stage_video={"render": {"num_inference_steps": 8}}))
    receipts = out / "receipts" / "keyframe"

    def waiting_keyframes() -> set[str]:
        return {p.stem for p in receipts.glob("*.json")} if receipts.exists() else set()

    waiting = _sigkill_driver(
        config, lambda: _committed(out) >= 1 and len(waiting_keyframes()) >= 2,
        "a commit, and keyframes waiting for the video stage",
        at_kill=lambda: {key: os.path.getmtime(out / "stages" / "keyframe" / f"{key}.png")
                         for key in waiting_keyframes()})
    committed = by_id(read_manifest(out, shards=True))
    videos = {i: os.path.getmtime(stored(out, r)) for i, r in committed.items()}

    result = run_cli("render", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(24)]
    assert all(r["status"] == "ok" for r in rows)
    assert {i: os.path.getmtime(stored(out, committed[i])) for i in committed} == videos
    for key, mtime in waiting.items():  # a stored keyframe is animated, not made again
        assert os.path.getmtime(out / "stages" / "keyframe" / f"{key}.png") == mtime
    stages = json.loads((out / "job.json").read_text())["last_run"]["stages"]
    left = 24 - len(committed)
    assert stages["keyframe"]["recovered"] >= len(waiting)
    assert stages["keyframe"]["recovered"] + stages["keyframe"]["made"] == left
    assert stages["video"]["recovered"] + stages["video"]["made"] == left
    assert run_cli("verify", str(out)).returncode == 0
    print(f"driver SIGKILL between stages: {len(committed)} rows committed before the kill, "
          f"{len(waiting)} keyframes waiting; the rerun made {stages['keyframe']['made']} "
          f"keyframes (recovered {stages['keyframe']['recovered']}) and "
          f"{stages['video']['made']} videos (recovered {stages['video']['recovered']})")
