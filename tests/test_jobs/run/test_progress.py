"""Progress: rate and ETA count rendering only, not the cluster's start or the model's load."""

from __future__ import annotations

from jobs.run.progress import Progress


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_leave_out_start_up_and_rows_done_before_rendering():
    clock = Clock()
    progress = Progress(100, enabled=False, clock=clock)
    progress.advance(0, 10)  # invalid rows, committed before any worker exists
    clock.now += 60  # a minute of cluster start and model loading
    assert progress.line() == "10/100 rows (10%), 10 failed, workers starting"
    progress.rendering_started()
    assert progress.line() == "10/100 rows (10%), 10 failed, rendering"
    clock.now += 10
    progress.advance(20, 0)
    # 20 rows in 10 s of rendering: 2 rows/s, 70 rows left: 35 s.
    assert progress.line() == "30/100 rows (30%), 10 failed, 2.00 rows/s, ETA 0m35s"
    progress.workers = {"video": 3}  # as the scheduler finds them: they follow the cluster
    assert progress.line() == "30/100 rows (30%), 10 failed, 2.00 rows/s, ETA 0m35s, 3 worker(s)"
    progress.workers = {"keyframe": 1, "video": 3}
    assert progress.line().endswith("ETA 0m35s, keyframe 1 worker(s), video 3 worker(s)")


def test_each_stage_shows_what_it_made_and_failed_and_its_rate_since_rendering_began():
    clock = Clock()
    progress = Progress(10, enabled=False, clock=clock)
    progress.rendering_started()
    clock.now += 4
    for _ in range(8):
        progress.stage_advance("keyframe", ok=True)
    progress.stage_advance("keyframe", ok=False)
    for _ in range(2):
        progress.stage_advance("video", ok=True)
    assert progress.stage_line() == "keyframe 8 made, 1 failed, 2.00/s; video 2 made, 0.50/s"


def test_a_cli_render_reports_start_up_apart_from_the_rendering_rate(tmp_path):
    from helpers import prompts, run_cli, write_config

    config = write_config(tmp_path, rows=prompts(2), cluster={"backend": "inline"})
    result = run_cli("render", str(config), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "videos/s while rendering; workers started and loaded the model in " in result.stdout
    assert "starting 1 worker(s) and loading tiny:modelscope" in result.stderr
