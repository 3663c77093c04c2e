"""A row a stage's worker would refuse (a shape its model cannot render, an input its pipeline
requires) fails before any stage renders it, with that stage's error code and name; ``plan``
counts it the same way. Shapes refused by a later stage are in test_plan_shapes.py."""

from __future__ import annotations

import os

from helpers import prompts, read_manifest, run_cli, stages_config, tiny_config, write_config
from helpers import write_prompts

from jobs.config import validate
from jobs.driver import render
from jobs.input.dataset import open_dataset
from jobs.input.plan import count_plan
from jobs.input.preflight import preflight
from jobs.store.hashset import HashSet

LTX_I2V_NEEDS = ("missing_input: LTXImageToVideoPipeline needs an image per row "
                 "(input column 'image')")


def test_plan_counts_rows_missing_an_input_and_render_fails_them_unrendered(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", prompts(4))
    out = tmp_path / "out"
    raw = tiny_config(src, str(out), model={"path": "tiny:ltx-i2v"},
                      render={"num_frames": 9}, cluster={"backend": "inline"})
    result = run_cli("plan", write_config(tmp_path, raw))
    assert result.returncode == 0, result.stderr
    assert "to do:      4 (4 invalid, of which 0 duplicate ids and 4 a stage's model" in result.stdout
    assert f"refused:    4 row(s) will fail as missing_input, e.g. {LTX_I2V_NEEDS[15:]}" \
        in result.stdout

    summary = render(validate(raw), progress=False)
    assert (summary.ok, summary.failed) == (0, 4)
    rows = read_manifest(out)
    assert {(r["error_code"], r["error"], r["failed_stage"]) for r in rows} == {
        ("missing_input", LTX_I2V_NEEDS, "video")}
    assert all([(s["name"], s["attempts"]) for s in r["stages"]] == [("video", 0)]
               and r["num_frames"] == 9 for r in rows)
    assert not (out / "videos").exists()  # no worker was asked


def test_a_later_stage_missing_its_input_costs_no_keyframe(tmp_path):
    """A video-to-video model after an image model takes no image: every row would be refused
    at the video stage, so none is rendered by the keyframe stage."""
    src = write_prompts(tmp_path / "in.parquet", prompts(3))
    out = tmp_path / "out"
    cfg = validate(stages_config(src, str(out), video="tiny:wan-v2v",
                                 cluster={"backend": "inline"}))
    counts = count_plan(open_dataset(src, []), cfg, HashSet(), preflight(cfg))
    assert counts.refused_rows("missing_input") == counts.invalid == 3
    summary = render(cfg, progress=False)
    assert summary.failed == 3
    rows = read_manifest(out)
    assert {(r["error_code"], r["failed_stage"]) for r in rows} == {("missing_input", "video")}
    assert "WanVideoToVideoPipeline needs a video per row" in rows[0]["error"]
    assert not os.path.exists(out / "stages" / "keyframe")


def test_a_stage_whose_model_is_unknown_here_is_left_to_its_workers(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", prompts(2))
    cfg = validate(tiny_config(src, str(tmp_path / "out"),
                               model={"path": "someone/not-cached-here"}))
    assert preflight(cfg).refusal(_task(cfg)) is None


def _task(cfg):
    from jobs.input.rows import resolve

    return resolve({"prompt": "a cat"}, "row", cfg)
