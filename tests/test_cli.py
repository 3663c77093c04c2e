"""The command line as users run it: exit codes, plan, status, and the messages they read."""

from __future__ import annotations

import json

from helpers import prompts, run_cli, tiny_config, write_prompts
from helpers import read_manifest, write_config


def test_render_on_a_local_ray_cluster_exits_0_and_says_where_things_are(tmp_path):
    config = write_config(tmp_path, rows=prompts(4))
    result = run_cli("render", config, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "rows: 4  ok: 4  failed: 0" in result.stdout
    assert f"videos:   {tmp_path}/out/videos/" in result.stdout
    assert f"manifest: {tmp_path}/out/manifest.parquet" in result.stdout
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["counts"] == {"rows": 4, "ok": 4, "failed": 0, "committed": 4}
    assert job["last_run"]["status"] == "finished" and job["versions"]["diffusers"]


def test_failed_rows_give_exit_3_and_status_shows_them(tmp_path):
    rows = prompts(3) + [{"id": "blank", "prompt": "   "}, {"id": "none", "prompt": None}]
    config = write_config(tmp_path, rows=rows, cluster={"backend": "inline"})
    result = run_cli("render", config, "--quiet")
    assert result.returncode == 3, result.stderr
    assert "rows: 5  ok: 3  failed: 2" in result.stdout
    assert "2 failed with invalid_prompt" in result.stdout
    table = read_manifest(tmp_path / "out")
    failed = {r["id"]: r for r in table if r["status"] == "failed"}
    assert set(failed) == {"blank", "none"}
    assert all(r["error_code"] == "invalid_prompt" and r["video_uri"] is None for r in failed.values())

    status = run_cli("status", str(tmp_path / "out"))
    assert status.returncode == 0
    assert "5 of 5 rows committed (complete)" in status.stdout
    assert "failed: 2" in status.stdout and "ok: 3" in status.stdout
    assert "invalid_prompt" in status.stdout
    assert "running since" not in status.stdout


def test_status_of_a_running_job_shows_what_its_driver_last_wrote(tmp_path):
    """A run holding the output writes its live figures with each lease renewal."""
    import time

    from jobs.store.lease import acquire, holder

    config = write_config(tmp_path, rows=prompts(2), cluster={"backend": "inline"})
    assert run_cli("render", config, "--quiet").returncode == 0
    out = str(tmp_path / "out")
    live = {"to_do": 40, "committed": 12, "failed": 1, "remaining": 28, "eta_s": 75.0,
            "stages": [{"name": "keyframe", "rows_per_s": 1.5, "inflight": 2, "waiting": 0,
                        "states": {"busy": 1, "ready": 0}},
                       {"name": "video", "rows_per_s": None, "inflight": 4, "waiting": 6,
                        "states": {"pending": 1, "loading": 2, "busy": 0}}]}
    with acquire(out, ttl_s=30, heartbeat_s=0.1) as held:
        held.live = live
        deadline = time.monotonic() + 10
        while holder(out).get("live") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = run_cli("status", out)
    assert running.returncode == 0, running.stderr
    lines = running.stdout.splitlines()
    assert lines[1].startswith("running since ") and " (pid " in lines[1]
    assert lines[2:5] == [
        "  12 of 40 rows committed by this run, 1 failed, ETA 1m15s",
        "  keyframe: 1.50 rows/s, workers 1 busy; 2 rows in flight, 0 waiting",
        "  video: workers 1 pending, 2 loading; 4 rows in flight, 6 waiting"]


def test_plan_counts_without_ray_or_a_model(tmp_path):
    rows = prompts(10) + [{"id": "row-001", "prompt": "again"}]
    config = write_config(tmp_path, rows=rows, output={"shard_size": 4})
    result = run_cli("plan", config, "--input", str(tmp_path / "prompts.parquet"))
    assert result.returncode == 0, result.stderr
    assert "rows:       11" in result.stdout
    assert "done:       0" in result.stdout
    assert "to do:      11 (1 invalid, of which 1 duplicate ids" in result.stdout
    assert "shards:     3 of up to 4 rows" in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_changed_setting_on_an_existing_output_is_refused(tmp_path):
    config = write_config(tmp_path, rows=prompts(2), cluster={"backend": "inline"})
    assert run_cli("render", config, "--quiet").returncode == 0
    result = run_cli("render", config, "--quiet", "--set", "render.num_frames=12")
    assert result.returncode == 1
    assert "render.num_frames: 8 -> 12" in result.stderr
    assert "render to a new output.uri" in result.stderr
    assert run_cli("render", config, "--quiet", "--set", "render.batch_size=1").returncode == 0


def test_version_and_a_csv_input_say_what_they_should(tmp_path):
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("reelfarm ")
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,prompt\na,a cat\n")
    config = write_config(tmp_path, rows=prompts(1))
    result = run_cli("plan", config, "--input", str(csv))
    assert result.returncode == 1
    assert "is not Parquet: reelfarm reads Parquet only; convert it" in result.stderr
    assert "to_parquet" in result.stderr


def test_make_tiny_model_refuses_a_non_empty_folder_unless_asked_to_replace_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old-weights.bin").write_bytes(b"old")
    refused = run_cli("make-tiny-model", str(folder), "--kind", "wan")
    assert refused.returncode == 1 and "is not empty" in refused.stderr
    assert (folder / "old-weights.bin").exists()
    replaced = run_cli("make-tiny-model", str(folder), "--kind", "wan", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert not (folder / "old-weights.bin").exists() and (folder / "model_index.json").exists()


def test_relative_paths_in_a_config_resolve_against_its_folder(tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    folder = tmp_path / "jobs"
    folder.mkdir()
    write_prompts(folder / "prompts.parquet", prompts(2))
    cfg = tiny_config("prompts.parquet", "../renders/out", cluster={"backend": "inline"})
    write_config(folder, cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "render", "../jobs/job.yaml",
                             "--quiet"], cwd=elsewhere, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": REPO}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "renders" / "out" / "_SUCCESS").exists()
    # A path on the command line is relative to where the command runs.
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "plan", "../jobs/job.yaml",
                             "--output", "here"], cwd=elsewhere, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": REPO}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"input:      {folder / 'prompts.parquet'} (1 file(s))" in result.stdout
    assert f"output:     {elsewhere / 'here'} (fingerprint" in result.stdout  # the shell's folder
