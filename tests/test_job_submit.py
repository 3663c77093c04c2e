"""A real ``ray start --head`` cluster on this machine, token auth on: ``ray job submit --
reelfarm render`` renders through it, and so does a driver started on the head node.

The head runs with ``--block`` in its own process group, and the test stops it by that pid.
Ray's temp dir is private to the test (``RAY_TMPDIR``), so ``--address auto`` finds this
cluster and no other developer's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli, tiny_config, write_prompts
from helpers import committed_shards, free_ports, ray_head_env, stop_process_group, write_config
from videos import probe

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")


@pytest.fixture(scope="module")
def ray_head():
    # Short: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    tmp = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
    # As the README advises: a loaded box stops slower.
    env = ray_head_env(tmp, RAY_JOB_STOP_WAIT_TIME_S="60")
    gcs, dashboard, client, agent = free_ports(4)
    log = open(os.path.join(tmp, "head.log"), "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--block"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(url, head, tmp)
        yield {"url": url, "env": env, "tmp": tmp}
    finally:
        stop_process_group(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_renders_through_the_cluster(ray_head, tmp_path):
    rows = 6
    out = tmp_path / "out"
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                      cluster={"num_workers": None})
    config = write_config(tmp_path, cfg)

    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["url"], "--",
         "reelfarm", "render", config, "--quiet"],
        capture_output=True, text=True, env=ray_head["env"], cwd=tmp_path, timeout=240)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "succeeded" in submit.stdout + submit.stderr
    assert "joined the Ray cluster" in submit.stdout + submit.stderr  # it did not start its own
    assert f"rows: {rows}  ok: {rows}  failed: 0" in submit.stdout

    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == rows and set(table["status"].to_pylist()) == {"ok"}
    for path in table["video_uri"].to_pylist():
        info = probe(str(out / path))
        assert info["codec"] == "h264" and info["frames"] == cfg["render"]["num_frames"]
    assert (out / "_SUCCESS").exists()
    verified = run_cli("verify", str(out))
    assert verified.returncode == 0, verified.stdout


def test_a_driver_on_the_head_node_joins_with_address_auto(ray_head, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(2)), str(out),
                      cluster={"num_workers": 1})
    result = subprocess.run([os.path.join(BIN, "reelfarm"), "render", write_config(tmp_path, cfg),
                             "--address", "auto", "--quiet"],
                            capture_output=True, text=True, env=ray_head["env"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "joined the Ray cluster" in result.stderr
    assert pq.read_table(out / "manifest.parquet").num_rows == 2


def test_a_relative_output_from_another_folder_is_one_output_where_the_driver_runs(ray_head,
                                                                                   tmp_path):
    # The head's workers run in its folder; the driver runs here and names the output relative
    # to here: every object and manifest must land here, not split between the two.
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(4)), "unused",
                      cluster={"num_workers": 2})
    result = subprocess.run([os.path.join(BIN, "reelfarm"), "render", write_config(tmp_path, cfg),
                             "--output", "out/x", "--address", "auto", "--quiet"],
                            capture_output=True, text=True, env=ray_head["env"], cwd=tmp_path,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out" / "x"
    assert len(os.listdir(out / "videos")) == 4 and (out / "_SUCCESS").exists()
    assert not os.path.exists(os.path.join(ray_head["tmp"], "out"))
    assert json.loads((out / "job.json").read_text())["config"]["output"]["uri"] == str(out)
    assert run_cli("verify", str(out)).returncode == 0


def test_ray_job_stop_stops_the_driver_cleanly_and_the_same_command_resumes(ray_head, tmp_path):
    # Long enough that the stop lands mid-run on a fast machine too: `ray job stop` itself takes
    # seconds to start, and 40 rows of 6 steps were all done by then (17 videos/s).
    rows, out = 60, tmp_path / "out"
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                      output={"shard_size": 2}, render={"num_inference_steps": 40},
                      cluster={"num_workers": 2})
    command = ["reelfarm", "render", write_config(tmp_path, cfg), "--quiet"]
    submit = subprocess.run([RAY, "job", "submit", "--address", ray_head["url"], "--no-wait",
                             "--", *command], capture_output=True, text=True,
                            env=ray_head["env"], timeout=120)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = re.search(r"'(raysubmit_\w+)'", submit.stdout + submit.stderr).group(1)
    deadline = time.monotonic() + 180
    while len(committed_shards(out)) < 2:
        assert time.monotonic() < deadline, "no shard committed within 180 s"
        time.sleep(0.2)
    stop = subprocess.run([RAY, "job", "stop", "--address", ray_head["url"], job_id],
                          capture_output=True, text=True, env=ray_head["env"], timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head["url"], job_id],
                          capture_output=True, text=True, env=ray_head["env"], timeout=60).stdout
    assert "interrupted; committed work is kept: rerun the same command to resume" in logs, logs[-3000:]
    assert "SystemError" not in logs and "exception set" not in logs
    job = json.loads((out / "job.json").read_text())
    assert job["last_run"]["status"] == "interrupted"
    committed = job["counts"]["committed"]
    assert 4 <= committed < rows

    resumed = subprocess.run([RAY, "job", "submit", "--address", ray_head["url"], "--", *command],
                             capture_output=True, text=True, env=ray_head["env"], timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{committed} row(s) were already done" in resumed.stdout
    assert run_cli("verify", str(out)).returncode == 0


def test_the_cluster_refuses_a_submission_without_the_token(ray_head, tmp_path):
    env = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    submit = subprocess.run([RAY, "job", "submit", "--address", ray_head["url"], "--", "true"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert submit.returncode != 0
    assert "Unauthorized" in submit.stdout + submit.stderr


def _wait_for_dashboard(url: str, head: subprocess.Popen, tmp: str, timeout_s: float = 120) -> None:
    """Until ``ray start`` says the cluster is up and the job server answers; a 401 without a
    token also proves token auth is on. (``auto`` only finds the cluster once it is up.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(os.path.join(tmp, "head.log")) as f:
            log = f.read()
        if "Ray runtime started" in log:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                raise AssertionError("the dashboard answered without a token: token auth is off")
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return
            except OSError:
                pass
        if head.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ray start --head did not come up:\n{log[-3000:]}")
        time.sleep(0.5)
