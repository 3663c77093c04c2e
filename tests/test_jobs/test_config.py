"""Config loading: YAML + --set overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest
from helpers import REPO, run_cli
from helpers import write_config

from jobs.config import ConfigError, fingerprint, load_config

BASE = {"input": {"uri": "in.parquet"}, "model": {"path": "tiny:modelscope"},
        "output": {"uri": "out"}}


@pytest.mark.parametrize("override, message", [
    ("render.num_frame=3", "render.num_frame: unknown key"),
    ("render.num_frames=0", "render.num_frames: Input should be greater than or equal to 1"),
    ("render.height=30", "render.height: 30 is not a multiple of 8"),
    ("render.width=4096", "render.width: 4096 is over limits.max_width = 2048"),
    ("render.guidance_scale=.nan", "render.guidance_scale: must be a finite number"),
    ("model.dtype=float64", "model.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ("cluster.num_workers=many", "cluster.num_workers: Input should be a valid integer"),
    ("encode.crf=99", "encode.crf: Input should be less than or equal to 51"),
    ("nonsense", "--set 'nonsense': expected KEY=VALUE"),
    ("output.uri.deep=1", "--set output.uri.deep: output.uri is not a section"),
    ("quality.dedup=true", "quality: quality.rules, quality.aesthetic_model and quality.dedup "
                           "need quality.clip_model"),
    ("output.webdataset.skip_duplicates=true", "output.webdataset.skip_duplicates leaves out "
                                               "what dedup finds: it needs quality.dedup"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(base=BASE, overrides=[override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_missing_required_section_is_named():
    with pytest.raises(ConfigError, match=r"^model: required key is missing"):
        load_config(base={"input": {"uri": "x"}, "output": {"uri": "y"}})


def test_overrides_are_typed_like_yaml():
    cfg = load_config(base=BASE, overrides=["render.num_frames=24", "render.guidance_scale=5",
                                            "render.negative_prompt=blurry, low quality",
                                            "cluster.address=auto"])
    assert cfg.render.num_frames == 24 and cfg.render.guidance_scale == 5.0
    assert cfg.render.negative_prompt == "blurry, low quality"
    assert cfg.cluster.address == "auto"


def test_fingerprint_follows_output_affecting_settings_only():
    base = load_config(base=BASE)
    assert fingerprint(base) == fingerprint(load_config(base=BASE, overrides=[
        "render.batch_size=8", "cluster.num_workers=4", "output.shard_size=7", "input.uri=other"]))
    for change in ("render.num_frames=9", "model.revision=abc", "encode.crf=20", "render.seed=3"):
        assert fingerprint(load_config(base=BASE, overrides=[change])) != fingerprint(base)
    scored = ["quality.clip_model=tiny:clip"]  # dedup finds duplicates, it changes no video
    assert fingerprint(load_config(base=BASE, overrides=scored)) == fingerprint(load_config(
        base=BASE, overrides=[*scored, "quality.dedup.threshold=0.9"]))


def test_every_shipped_config_is_valid():
    import glob

    paths = sorted(glob.glob(f"{REPO}/configs/*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_cli_reports_a_config_error_in_one_line_with_exit_1(tmp_path):
    config = write_config(tmp_path, {**BASE, "render": {"num_frames": -4}})
    result = run_cli("plan", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == ("reelfarm: render.num_frames: Input should be greater than "
                                     "or equal to 1 (got -4)")


def test_unreadable_and_malformed_configs(tmp_path):
    missing = run_cli("plan", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "cannot read config" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    result = run_cli("plan", str(bad))
    assert result.returncode == 1 and "is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2():
    assert run_cli("render").returncode == 2
    assert run_cli("frobnicate").returncode == 2


def test_a_pipeline_class_no_adapter_drives_is_refused_naming_the_supported_ones():
    with pytest.raises(ConfigError) as refused:
        load_config(base={**BASE, "model": {"path": "tiny:wan", "pipeline": "MochiPipeline"}})
    message = str(refused.value)
    assert message.startswith("model.pipeline: MochiPipeline is not a pipeline reelfarm can "
                              "drive; supported: CogVideoXImageToVideoPipeline, ")
    assert "WanVideoToVideoPipeline" in message


def test_a_loaded_pipeline_of_an_unknown_class_is_refused():
    from rendering.pipelines import UnsupportedPipeline, adapter_for

    MochiPipeline = type("MochiPipeline", (), {})
    with pytest.raises(UnsupportedPipeline, match="MochiPipeline is not a pipeline reelfarm can "
                                                  "drive; supported: "):
        adapter_for(MochiPipeline())


STAGES = {"input": {"uri": "in.parquet"}, "output": {"uri": "out"},
          "stages": [{"name": "keyframe", "model": {"path": "tiny:sdxl"}},
                     {"name": "video", "model": {"path": "tiny:ltx-i2v"}}]}


@pytest.mark.parametrize("override, message", [
    ("stages.video.render.height=128", "stages.video.render: height and width of the last stage are "
                                   "the row's"),
    ("stages.0.render.width=100", "stages.keyframe.render.width: 100 is not a multiple of 8"),
    ("stages.0.render.height=4096", "stages.keyframe.render.height: 4096 is over "
                                    "limits.max_height = 2048"),
    ("stages.nope.render.height=8", "--set stages.nope.render.height: stages has no stage 'nope'"),
    ("render.media_resize=error", "stages.keyframe.render sets its own size, and "
                                  "render.media_resize 'error' would fail every row"),
])
def test_an_earlier_stage_may_have_its_own_size_the_last_may_not(override, message):
    base = {**STAGES, "stages": [dict(STAGES["stages"][0], render={"height": 1024}),
                                 STAGES["stages"][1]]}
    assert load_config(base=base).stages[0].render.overrides()["height"] == 1024
    with pytest.raises(ConfigError) as err:
        load_config(base=base, overrides=[override])
    assert str(err.value).startswith(message), str(err.value)


def test_a_setting_added_later_at_its_old_behaviour_keeps_old_fingerprints():
    """quality.on_unsafe came after outputs of format 1 were made: at "keep" (what reelfarm did
    before it) an old output's fingerprint is unchanged; another value changes it."""
    before = fingerprint(load_config(base=BASE))
    assert fingerprint(load_config(base=BASE, overrides=["quality.on_unsafe=keep"])) == before
    assert fingerprint(load_config(base=BASE, overrides=["quality.on_unsafe=fail"])) != before
