"""One output, where the user named it: relative paths resolve in the driver's folder, workers
prove at start that they write where the driver reads, and ``_SUCCESS`` waits for a listing
that shows every committed object.

The cases with workers in other folders (a ``ray start`` head, nodes of a simulated cluster) are
in test_job_submit.py and test_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import prompts, run_cli, tiny_config, write_prompts
from helpers import write_config

from jobs.verify import unlisted_artifacts
from jobs.config import validate
from jobs.driver import render


def test_a_relative_output_is_recorded_and_written_where_the_driver_runs(tmp_path):
    config = write_config(tmp_path, rows=prompts(2), output_uri="unused",
                          cluster={"backend": "inline"})
    here = tmp_path / "here"
    here.mkdir()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "render", config,
                             "--output", "out/x", "--quiet"], cwd=here, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    job = json.loads((here / "out" / "x" / "job.json").read_text())
    assert job["config"]["output"]["uri"] == str(here / "out" / "x")
    assert len(os.listdir(here / "out" / "x" / "videos")) == 2


def test_workers_that_store_where_the_driver_cannot_read_are_refused_at_start(tmp_path):
    """memory:// lives in each process: Ray's workers store their probes in their own memory,
    as workers on machines without the driver's disk would on theirs."""
    config = write_config(tmp_path, rows=prompts(2), output_uri="memory://farm/out",
                          cluster={"num_workers": 1})
    result = run_cli("render", config, "--quiet")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("reelfarm: output memory://farm/out: a worker (pid "), line
    assert "cannot read back" in line and "object-store URI" in line and "same path on every node" in line
    assert "Traceback" not in result.stderr


def test_success_waits_for_a_listing_that_shows_every_committed_object(tmp_path):
    out = tmp_path / "out"
    cfg = validate(tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(3)), str(out),
                               cluster={"backend": "inline"}))
    assert render(cfg, progress=False).complete
    assert unlisted_artifacts(str(out)) == (0, [])

    video = sorted((out / "videos").iterdir())[0]
    video.write_bytes(video.read_bytes()[:-1])  # the listing shows another size
    (sorted((out / "videos").iterdir())[1]).unlink()
    count, examples = unlisted_artifacts(str(out))
    assert count == 2 and all(e.startswith("video of row 'row-00") for e in examples), examples

    # A rerun that looks at the output again (its input was written again since) has nothing to
    # render, and does not call the output complete.
    os.utime(cfg.input.uri, (time.time() + 5, time.time() + 5))
    result = run_cli("render", write_config(tmp_path, cfg.model_dump(mode="json")), "--quiet")
    assert result.returncode == 1
    assert "2 committed object(s) are not in the output where its manifests say" in result.stderr
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "job.json").read_text())["last_run"]["status"] == "finished"
