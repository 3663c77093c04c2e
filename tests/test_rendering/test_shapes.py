"""A video shape the model cannot make fails its rows before rendering, with a message that
says which shapes would do, and the job's other rows render."""

from __future__ import annotations

import pytest
from helpers import tiny_config, write_prompts

from jobs.store import manifest
from jobs.config import validate
from jobs.driver import render
from rendering.pipelines import adapter_for
from rendering.pipelines.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("wan")


@pytest.mark.parametrize("frames, height, width, message", [
    (17, 32, 32, None),
    (1, 16, 48, None),
    (16, 32, 32, "WanPipeline renders 4k+1 frames; num_frames=16 is not one (13 or 17 is)"),
    (17, 40, 32, "WanPipeline needs height and width divisible by 16; 40x32 is not "
                 "(nearest: 48x32)"),
    (17, 32, 24, "WanPipeline needs height and width divisible by 16; 32x24 is not "
                 "(nearest: 32x32)"),
])
def test_wan_shapes(wan, frames, height, width, message):
    assert adapter_for(wan).shape_problem(wan, frames, height, width) == message


def test_a_unet_model_needs_sides_divisible_by_its_vae_factor():
    pipe = build_tiny_pipeline("modelscope")
    factor = pipe.vae_scale_factor
    assert factor > 1
    adapter = adapter_for(pipe)
    assert adapter.shape_problem(pipe, 16, 8 * factor, 4 * factor) is None
    assert adapter.shape_problem(pipe, 16, 8 * factor + 1, 4 * factor) == (
        f"TextToVideoSDPipeline needs height and width divisible by {factor}; "
        f"{8 * factor + 1}x{4 * factor} is not (nearest: {8 * factor}x{4 * factor})")


@pytest.mark.parametrize("kind, frames, height, width, message", [
    ("cogvideox", 9, 32, 32, None),
    ("cogvideox", 16, 32, 32, None),
    ("cogvideox", 13, 32, 32, "CogVideoXPipeline renders 8k or 8k+1 frames; num_frames=13 is not "
                              "one (9 or 16 is)"),
    ("cogvideox", 9, 24, 32, "CogVideoXPipeline needs height and width divisible by 16; 24x32 is "
                             "not (nearest: 32x32)"),
    ("cogvideox-i2v", 9, 48, 48, "CogVideoXImageToVideoPipeline renders only 32x32 (its "
                                 "transformer learned positional embeddings for that size); 48x48 "
                                 "is not it"),
    ("ltx", 17, 64, 32, None),
    ("ltx", 8, 32, 32, "LTXPipeline renders 8k+1 frames; num_frames=8 is not one (1 or 9 is)"),
    ("ltx", 9, 48, 32, "LTXPipeline needs height and width divisible by 32; 48x32 is not "
                       "(nearest: 64x32)"),
    ("wan-i2v", 6, 32, 32, "WanImageToVideoPipeline renders 4k+1 frames; num_frames=6 is not one "
                           "(5 or 9 is)"),
    ("svd", 1, 32, 32, "StableVideoDiffusionPipeline renders at least 2 frames; num_frames=1 is "
                       "too few (nearest: 2)"),
    ("svd", 14, 40, 24, None),
    ("modelscope-v2v", 4, 12, 16, "VideoToVideoSDPipeline needs height and width divisible by 8; "
                                  "12x16 is not (nearest: 16x16)"),
])
def test_each_family_refuses_exactly_the_shapes_it_would_not_render_exactly(kind, frames, height,
                                                                           width, message):
    pipe = build_tiny_pipeline(kind)
    assert adapter_for(pipe).shape_problem(pipe, frames, height, width) == message


def test_rows_of_an_impossible_shape_fail_alone_and_are_not_rendered(tmp_path):
    rows = [{"id": "good-0", "prompt": "a red cube", "num_frames": None},
            {"id": "sixteen", "prompt": "a blue cube", "num_frames": 16},
            {"id": "good-1", "prompt": "a green cube", "num_frames": None}]
    src = write_prompts(tmp_path / "in.parquet", rows)
    out = str(tmp_path / "out")
    cfg = validate(tiny_config(src, out, model={"path": "tiny:wan"}, render={"num_frames": 5},
                               cluster={"backend": "inline", "max_attempts": 3}))
    result = render(cfg, progress=False)
    assert (result.ok, result.failed) == (2, 1)
    by_id = {r["id"]: r for table in manifest.iter_shards(out) for r in table.to_pylist()}
    bad = by_id["sixteen"]
    assert bad["status"] == "failed" and bad["error_code"] == "invalid_shape"
    assert "num_frames=16 is not one (13 or 17 is)" in bad["error"]
    # Rendered, Wan would have made 13 frames and failed the frame check as a render_error.
    assert bad["video_uri"] is None
    assert {by_id["good-0"]["status"], by_id["good-1"]["status"]} == {"ok"}
