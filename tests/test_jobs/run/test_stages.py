"""Multi-stage jobs end to end: a keyframe per prompt from a text-to-image stage, a video from it
by an image-to-video stage, each stage on its own workers; per-stage failures, resume and
fingerprints. Faults (killed drivers and workers) are in test_faults.py; the scheduler's flow
between stages against fake pools in test_schedule.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from helpers import prompts, run_cli, stages_config, write_prompts
from helpers import by_id, read_manifest, write_config
from PIL import Image
from videos import probe

from jobs.status import status
from jobs.verify import verify
from jobs.config import ConfigError, validate
from jobs.store.job_file import OutputError
from rendering.contract import MediaInput
from jobs.driver import render

# Flux's keyframes need sides divisible by 16, LTX's videos 8k+1 frames; a 64x64 keyframe is
# over the media limit the video stage reads it under (MEDIA_LIMIT). (Parquet columns come
# from the first row's keys.)
ROWS = [{"id": "narrow", "prompt": "a narrow keyframe", "width": 40, "height": None,
         "num_frames": None},
        {"id": "short", "prompt": "a clip of 8 frames", "width": None, "height": None,
         "num_frames": 8},
        {"id": "big", "prompt": "a big keyframe", "width": 64, "height": 64, "num_frames": None},
        *prompts(4)]
MEDIA_LIMIT = {"max_media_pixels": 32 * 32}


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _artifacts(row: dict) -> dict[str, dict]:
    return {a["name"]: a for a in row["artifacts"]}


def test_a_two_stage_job_on_ray_keeps_keyframes_and_records_the_stage_that_failed_a_row(tmp_path, ray_local):
    src = write_prompts(tmp_path / "prompts.parquet", ROWS)
    out = tmp_path / "out"
    summary = render(validate(stages_config(src, str(out), keyframe="tiny:flux",
                                            limits=MEDIA_LIMIT)), progress=False)
    assert (summary.ok, summary.failed, summary.rendered) == (4, 3, 4)
    rows = by_id(read_manifest(out))

    for row_id in [f"row-{i:03d}" for i in range(4)]:
        row = rows[row_id]
        assert row["status"] == "ok" and row["failed_stage"] is None
        assert [(s["name"], s["status"], s["attempts"]) for s in row["stages"]] == [
            ("keyframe", "ok", 1), ("video", "ok", 1)]
        keyframe, video = _artifacts(row)["keyframe"], _artifacts(row)["video"]
        assert keyframe["path"].startswith("stages/keyframe/") and keyframe["path"].endswith(".png")
        with Image.open(out / keyframe["path"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert _sha256(out / keyframe["path"]) == keyframe["sha256"]
        assert (video["path"], video["sha256"]) == (row["video_uri"], row["sha256"])
        assert probe(str(out / video["path"])) == {"codec": "h264", "pix_fmt": "yuv420p",
                                                   "size": (32, 32), "frames": 9, "faststart": True}
    # A row a stage would refuse fails before any stage renders it, in the stage that would.
    for row_id, stage in (("narrow", "keyframe"), ("short", "video")):
        row = rows[row_id]
        assert (row["status"], row["error_code"], row["failed_stage"]) == (
            "failed", "invalid_shape", stage)
        assert [(s["name"], s["attempts"]) for s in row["stages"]] == [(stage, 0)]
        assert row["artifacts"] == []
    # A row the video stage fails when it renders keeps its keyframe, recorded and stored.
    big = rows["big"]
    assert (big["status"], big["error_code"], big["failed_stage"]) == (
        "failed", "invalid_media", "video")
    assert list(_artifacts(big)) == ["keyframe"]
    assert _sha256(out / big["artifacts"][0]["path"]) == big["artifacts"][0]["sha256"]

    assert verify(str(out)).problems == []
    assert status(str(out))["by_stage"] == {"keyframe": {"ok": 5, "failed": 1},
                                            "video": {"ok": 4, "failed": 2}}
    figures = json.loads((out / "job.json").read_text())["last_run"]["stages"]
    assert (figures["keyframe"]["made"], figures["video"]["made"]) == (5, 4)
    assert figures["keyframe"]["workers"] == figures["video"]["workers"] == 1
    # The failed row's kept keyframe is checked like any artifact.
    kept = out / big["artifacts"][0]["path"]
    stored = kept.read_bytes()
    kept.unlink()
    assert verify(str(out)).problems == [f"keyframe of row 'big' is missing: {kept}"]

    # A repair takes the kept keyframe up again (its size and sha256 checked): only the video
    # is made. The rows a stage refuses are refused again.
    kept.write_bytes(stored)
    summary = render(validate(stages_config(src, str(out), keyframe="tiny:flux")),
                     progress=False, redo=frozenset({"failed"}))
    assert (summary.ok, summary.failed) == (5, 2)
    repaired = by_id(read_manifest(out))["big"]
    assert repaired["status"] == "ok" and repaired["redo_of"] is not None
    assert _artifacts(repaired)["keyframe"] == _artifacts(big)["keyframe"]
    figures = json.loads((out / "job.json").read_text())["last_run"]["stages"]
    assert (figures["keyframe"]["made"], figures["keyframe"]["recovered"]) == (0, 1)
    assert figures["video"]["made"] == 1
    assert verify(str(out)).problems == []


def test_a_stage_task_fixes_the_stage_settings_and_takes_the_previous_artifact_by_hash():
    from jobs import params as P
    from jobs.stages import job_stages
    from rendering.contract import Artifact, Result, Task

    cfg = validate(stages_config("x.parquet", "/out"))
    keyframe, video = job_stages(cfg)
    assert (keyframe.artifact, keyframe.folder, keyframe.receipts_folder, keyframe.takes) == \
        ("keyframe", "stages/keyframe", "receipts/keyframe", None)
    assert (video.artifact, video.folder, video.takes, video.final) == \
        ("video", "videos", "keyframe", True)
    params = {"guidance_scale": 7.5, "num_frames": 9}
    task = Task("r", "r-key", 7, "a fox", params, {}, P.batch_key(params))
    assert video.task_given(task, None) is task  # nothing to fix, nothing handed on
    first = keyframe.task(task, [])
    assert first.params == {"guidance_scale": 5.0, "num_frames": 9} and first.seed == 7
    # Rows batch by the settings the stage uses, not the row's.
    assert first.batch_key == P.batch_key(first.params) != task.batch_key
    png = Artifact("keyframe", "stages/keyframe/r-key.png", 10, "ab" * 32, "image")
    second = video.task(task, [Result("r", True, [png])])  # what the stage before stored
    assert second.params == task.params
    assert second.inputs["image"] == MediaInput(uri="/out/stages/keyframe/r-key.png",
                                                sha256="ab" * 32)
    # The artifact's kind, not its name, says what it becomes: a clip is the video input.
    clip = Artifact("clip", "stages/clip/r-key.png", 10, "cd" * 32, "video")
    assert set(video.task_given(task, clip).inputs) == {"video"}


def test_keyframes_stored_before_a_crash_go_straight_to_the_video_stage(tmp_path):
    """The keyframe stage stored four keyframes (one since damaged), then everything died
    before any video: the resumed run renders only the missing keyframes."""
    from jobs.input.dataset import open_dataset
    from jobs.run.workers import worker_spec
    from jobs.store.hashset import HashSet
    from jobs.input.plan import PlanCounts, plan_rows
    from jobs.stages import job_stages
    from rendering.worker import ShardRenderer

    out = tmp_path / "out"
    src = write_prompts(tmp_path / "prompts.parquet", prompts(6))
    cfg = validate(stages_config(src, str(out), cluster={"backend": "inline"}))
    keyframe = job_stages(cfg)[0]
    planned = list(plan_rows(open_dataset(src, []), cfg, HashSet(), PlanCounts()))
    early = ShardRenderer(worker_spec(cfg, keyframe)).render_shard(
        [keyframe.task(p.outcome, []) for p in planned[:4]])
    assert all(r.ok for r in early) and len(os.listdir(out / "receipts" / "keyframe")) == 4
    with open(out / early[3].artifact("keyframe").path, "r+b") as f:
        f.seek(60)
        f.write(b"\xde\xad")
    mtimes = {r.id: os.path.getmtime(out / r.artifact("keyframe").path) for r in early[:3]}
    half_written = out / "stages" / "keyframe" / ".row-005.png.tmp-1234"  # a write cut short
    half_written.write_bytes(b"half a keyframe")

    summary = render(cfg, progress=False)
    assert not half_written.exists()
    assert (summary.ok, summary.rendered) == (6, 6)
    figures = json.loads((out / "job.json").read_text())["last_run"]["stages"]
    assert (figures["keyframe"]["recovered"], figures["keyframe"]["made"]) == (3, 3)
    assert {r.id: os.path.getmtime(out / r.artifact("keyframe").path) for r in early[:3]} == mtimes
    rows = by_id(read_manifest(out))
    assert [s["attempts"] for s in rows["row-000"]["stages"]] == [1, 1]
    assert not (out / "receipts").exists()
    assert verify(str(out)).problems == []
    # verify checks keyframes as it checks videos: each one listed, and nothing unlisted.
    gone = out / _artifacts(rows["row-001"])["keyframe"]["path"]
    gone.unlink()
    (out / "stages" / "keyframe" / "stray.png").write_bytes(b"not a keyframe")
    assert verify(str(out)).problems == [
        f"keyframe of row 'row-001' is missing: {gone}",
        f"object {out / 'stages' / 'keyframe' / 'stray.png'} is not in any manifest"]


def test_changing_a_stage_of_a_finished_job_is_refused_naming_the_stage(tmp_path):
    src = write_prompts(tmp_path / "prompts.parquet", prompts(2))
    out = tmp_path / "out"
    base = stages_config(src, str(out), cluster={"backend": "inline"})
    render(validate(base), progress=False)
    changed = stages_config(src, str(out), cluster={"backend": "inline"}, video="tiny:svd")
    changed["render"]["num_frames"] = 9
    with pytest.raises(OutputError) as refused:
        render(validate(changed), progress=False)
    assert "stages.1.video.model.path: 'tiny:ltx-i2v' -> 'tiny:svd'" in str(refused.value)
    assert "render to a new output.uri" in str(refused.value)


@pytest.mark.parametrize("change, message", [
    ({"model": {"path": "tiny:sd"}}, "model: StableDiffusionPipeline makes images, not videos"),
    ({"stages": [{"name": "clip", "model": {"path": "tiny:ltx-i2v"}},
                 {"name": "keyframe", "model": {"path": "tiny:sd"}}]},
     "stages.keyframe.model: StableDiffusionPipeline makes images, not videos"),
    ({"stages": [{"name": "a", "model": {"path": "tiny:sd"}},
                 {"name": "a", "model": {"path": "tiny:svd"}}]}, "stages: names must differ"),
    ({"stages": [{"name": "video", "model": {"path": "tiny:sd"}},
                 {"name": "clip", "model": {"path": "tiny:svd"}}]},
     "stages: 'video' names an artifact of the final video"),
    ({"stages": [{"name": "k", "model": {"path": "tiny:sd"}, "render": {"fps": 8}},
                 {"name": "v", "model": {"path": "tiny:svd"}}]}, "stages.0.render.fps: unknown key"),
    ({"stages": [{"name": "k", "model": {"path": "tiny:sd"}},
                 {"name": "v", "model": {"path": "tiny:svd"}, "render": {"height": 64}}]},
     "stages.v.render: height and width of the last stage are the row's"),
    ({"stages": []}, "stages: list at least one stage"),
    ({"stages": [{"name": "k", "model": {"path": "tiny:sd"}},
                 {"name": "v", "model": {"path": "tiny:svd"},
                  "resources": {"workers": {"min": 4, "max": 2}}}]},
     "stages.1.resources.workers: max (2) is below min (4)"),
    ({"stages": [{"name": "k", "model": {"path": "tiny:sd"}},
                 {"name": "v", "model": {"path": "tiny:svd"},
                  "resources": {"workers": {"mni": 2}}}]},
     "stages.1.resources.workers.mni: unknown key; did you mean stages.1.resources.workers.min?"),
    ({"stages": [{"name": "k", "model": {"path": "tiny:sd"}},
                 {"name": "v", "model": {"path": "tiny:svd"}, "resources": {"workers": 0}}]},
     "stages.1.resources.workers: Input should be greater than or equal to 1 (got 0)"),
])
def test_stage_configs_that_cannot_work_are_refused_in_one_line(tmp_path, change, message):
    cfg = {"input": {"uri": "x.parquet"}, "output": {"uri": str(tmp_path / "out")}, **change}
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert str(refused.value).startswith(message)


def test_an_image_model_as_the_last_stage_fails_the_cli_in_one_line(tmp_path):
    config = write_config(tmp_path, rows=prompts(1))
    result = run_cli("render", str(config), "--set", "model.path=tiny:sdxl")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("StableDiffusionXLPipeline makes images, not videos: it "
                                          "can only be an earlier stage of a job with stages: (a "
                                          "keyframe stage before an image-to-video one)")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_webdataset_samples_of_a_two_stage_job_carry_the_keyframe(tmp_path):
    import tarfile

    src = write_prompts(tmp_path / "prompts.parquet", prompts(3))
    out = tmp_path / "out"
    render(validate(stages_config(src, str(out), cluster={"backend": "inline"},
                                  output={"webdataset": True})), progress=False)
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        members = tar.getnames()
    keys = sorted({name.split(".", 1)[0] for name in members})
    assert len(keys) == 3
    assert sorted(members) == sorted(f"{k}.{ext}" for k in keys
                                     for ext in ("json", "txt", "mp4", "keyframe.png"))
    assert verify(str(out)).problems == []
