"""``reelfarm plan`` knows the model's shape rules from its config files alone (no torch, no
weights): it counts the rows ``render`` would fail as ``invalid_shape``, and says why.

The rule is one (``ShapeFacts.problem``); its numbers come from a loaded pipeline (the worker)
or from config files (plan). Here both readings agree for every tiny kind, as declared, as
saved by ``save_pretrained`` and as found in a hub cache, and for the published checkpoints'
configs; and plan's counts equal what render then records.
"""

from __future__ import annotations

import inspect
import os
import shutil

import pytest
from helpers import run_cli, stages_config, tiny_config, write_prompts
from helpers import read_manifest, write_config

from jobs.store import manifest
from jobs.config import validate
from jobs.input.dataset import open_dataset
from jobs.driver import render
from jobs.store.hashset import HashSet
from jobs.store.job_file import OutputError
from jobs.store.location import check_output_is_folder
from jobs.input.plan import count_plan
from jobs.input.preflight import preflight
from rendering.pipelines import ADAPTERS, adapter_for, known_shapes
from rendering.pipelines.shapes import ShapeFacts, folder_configs
from rendering.pipelines.tiny import TINY_KINDS, build_tiny_pipeline, tiny_configs

WAN_16 = "WanPipeline renders 4k+1 frames; num_frames=16 is not one (13 or 17 is)"


# -- one rule, two readings ---------------------------------------------------------------

@pytest.mark.parametrize("kind", TINY_KINDS)
def test_facts_from_configs_equal_facts_from_the_loaded_pipe(kind, tmp_path):
    pipe = build_tiny_pipeline(kind)
    adapter = adapter_for(pipe)
    declared = tiny_configs(kind)
    assert declared.pipeline == type(pipe).__name__
    from_pipe = adapter.facts_from_pipe(pipe)
    assert adapter.facts_from_configs(declared.components) == from_pipe
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    saved = folder_configs(str(tmp_path))
    assert saved.pipeline == declared.pipeline
    assert known_shapes(str(tmp_path)).facts == from_pipe
    # What the declared configs say of each component is what the built one holds.
    for name, config in declared.components.items():
        built = dict(getattr(pipe, name).config)
        assert {k: _plain(built[k]) for k in config} == {k: _plain(v) for k, v in config.items()}
    # A config file that leaves a key out gets diffusers' default: the adapters' defaults
    # are the component classes' own.
    for name, defaults in (("vae", adapter.vae_defaults),
                           ("unet" if "unet" in declared.components else "transformer",
                            adapter.denoiser_defaults)):
        params = inspect.signature(type(getattr(pipe, name)).__init__).parameters
        assert {k: _plain(params[k].default) for k in defaults} == \
            {k: _plain(v) for k, v in defaults.items()}, (kind, name)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _meta(cls, **config):
    import torch

    with torch.device("meta"):
        return cls(**config)


def _published():
    """The shape-deciding keys of published checkpoints' configs (as on the hub), with a tiny
    denoiser carrying the real one's shape keys; built on the meta device (no memory)."""
    import diffusers as d

    from rendering.pipelines import cogvideox, ltx, modelscope, svd, wan

    wan21_vae = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                     temperal_downsample=[False, True, True])
    wan22_vae = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
                     num_res_blocks=2, in_channels=12, out_channels=12, is_residual=True,
                     patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                     temperal_downsample=[False, True, True])
    cog_vae = dict(block_out_channels=[128, 256, 256, 512], latent_channels=16,
                   temporal_compression_ratio=4)
    cog_i2v = dict(cogvideox._I2V_TRANSFORMER, sample_height=60, sample_width=90, patch_size=2)
    ltx091_vae = dict(block_out_channels=[128, 256, 512, 512], patch_size=4, patch_size_t=1,
                      spatio_temporal_scaling=[True, True, True, False], latent_channels=128)
    ltx095_vae = dict(ltx091_vae, spatio_temporal_scaling=[True, True, True, True],
                      spatial_compression_ratio=32, temporal_compression_ratio=8)
    sd_vae = dict(block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4)
    svd_vae = dict(block_out_channels=[128, 256, 512, 512],
                   down_block_types=["DownEncoderBlock2D"] * 4)
    return [
        # (pipeline, vae class, vae, denoiser name, class, config, expected facts)
        ("WanPipeline", d.AutoencoderKLWan, wan21_vae, "transformer", d.WanTransformer3DModel,
         wan._TRANSFORMER, dict(frame_period=4, side_multiple=16)),
        ("WanVideoToVideoPipeline", d.AutoencoderKLWan, wan21_vae, "transformer",
         d.WanTransformer3DModel, wan._TRANSFORMER, dict(frame_period=4, side_multiple=16)),
        ("WanPipeline", d.AutoencoderKLWan, wan22_vae, "transformer", d.WanTransformer3DModel,
         wan._TRANSFORMER, dict(frame_period=4, side_multiple=32)),
        ("CogVideoXImageToVideoPipeline", d.AutoencoderKLCogVideoX, cog_vae, "transformer",
         d.CogVideoXTransformer3DModel, cog_i2v,
         dict(frame_period=8, frame_residues=(0, 1), side_multiple=16, only_size=(480, 720))),
        ("CogVideoXVideoToVideoPipeline", d.AutoencoderKLCogVideoX, cog_vae, "transformer",
         d.CogVideoXTransformer3DModel, dict(cogvideox._TRANSFORMER, patch_size_t=2),
         dict(frame_period=8, frame_residues=(0,), side_multiple=16, max_size=(32, 32))),
        ("LTXPipeline", d.AutoencoderKLLTXVideo, ltx091_vae, "transformer",
         d.LTXVideoTransformer3DModel, ltx._TRANSFORMER, dict(frame_period=8, side_multiple=32)),
        ("LTXImageToVideoPipeline", d.AutoencoderKLLTXVideo, ltx095_vae, "transformer",
         d.LTXVideoTransformer3DModel, ltx._TRANSFORMER, dict(frame_period=8, side_multiple=32)),
        ("TextToVideoSDPipeline", d.AutoencoderKL, sd_vae, "unet", d.UNet3DConditionModel,
         modelscope._UNET, dict(side_multiple=8)),
        ("StableVideoDiffusionPipeline", d.AutoencoderKLTemporalDecoder, svd_vae, "unet",
         d.UNetSpatioTemporalConditionModel, svd._UNET, dict(side_multiple=8, min_frames=2)),
    ]


def test_published_checkpoints_configs_give_what_their_pipelines_compute():
    import diffusers

    for pipeline, vae_cls, vae, name, denoiser_cls, denoiser, expected in _published():
        cls = getattr(diffusers, pipeline)
        components = {p: None for p in inspect.signature(cls.__init__).parameters
                      if p != "self"}
        components.update(vae=_meta(vae_cls, **vae), **{name: _meta(denoiser_cls, **denoiser)})
        pipe = cls(**components)
        adapter = ADAPTERS[pipeline]
        from_configs = adapter.facts_from_configs({"vae": vae, name: denoiser})
        assert from_configs == adapter.facts_from_pipe(pipe) == ShapeFacts(pipeline, **expected)


# -- plan counts what render fails ----------------------------------------------------------

def _rows(overrides: dict) -> list[dict]:
    """Four plain rows (the config's shape) and one per override."""
    rows = [{"id": f"plain-{i}", "prompt": f"a plain scene {i}", "num_frames": None,
             "height": None, "width": None} for i in range(4)]
    for row_id, shape in overrides.items():
        rows.append({"id": row_id, "prompt": f"scene {row_id}", "num_frames": None,
                     "height": None, "width": None, **shape})
    return rows


# model, config shape, per-row overrides, expected invalid_shape rows, example reason
CASES = {
    "wan": ("tiny:wan", {"num_frames": 16, "height": 32, "width": 32},
             {"ok-17": {"num_frames": 17}, "bad-12": {"num_frames": 12}}, 5, WAN_16),
    "ltx": ("tiny:ltx", {"num_frames": 8, "height": 32, "width": 32},
            {"ok-9": {"num_frames": 9}}, 4,
            "LTXPipeline renders 8k+1 frames; num_frames=8 is not one (1 or 9 is)"),
    "cogvideox-i2v": ("tiny:cogvideox-i2v", {"num_frames": 9, "height": 48, "width": 48},
                      {"bad-64": {"height": 64, "width": 64}}, 5,
                      "CogVideoXImageToVideoPipeline renders only 32x32 (its transformer "
                      "learned positional embeddings for that size); 48x48 is not it"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_counts_the_rows_render_fails_as_invalid_shape(tmp_path, case):
    model, shape, overrides, expected, example = CASES[case]
    src = write_prompts(tmp_path / "in.parquet", _rows(overrides))
    out = str(tmp_path / "out")
    raw = tiny_config(src, out, model={"path": model}, render=dict(shape, batch_size=1),
                      cluster={"backend": "inline", "max_attempts": 1})
    result = run_cli("plan", write_config(tmp_path, raw))
    assert result.returncode == 0, result.stderr
    rows = 4 + len(overrides)
    assert (f"to do:      {rows} ({expected} invalid, of which 0 duplicate ids and {expected} "
            f"a stage's model would refuse") in result.stdout
    assert f"{expected} row(s) will fail as invalid_shape, e.g. {example}" in result.stdout
    assert "from the tiny model's configs" in result.stdout

    summary = render(validate(raw), progress=False)
    codes = [r["error_code"] for t in manifest.iter_shards(out) for r in t.to_pylist()]
    assert codes.count("invalid_shape") == expected
    # The rows plan lets through render (an I2V row without its image fails as missing_input).
    assert summary.failed == expected + codes.count("missing_input")
    assert summary.ok == rows - summary.failed


def test_a_saved_model_folder_and_a_hub_cache_give_the_same_rules(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "wan-model"
    made = run_cli("make-tiny-model", str(folder), "--kind", "wan")
    assert made.returncode == 0, made.stderr
    src = write_prompts(tmp_path / "in.parquet", _rows({"bad-w": {"num_frames": 17, "width": 40},
                                                         "ok-5": {"num_frames": 5}}))
    out = str(tmp_path / "out")
    raw = tiny_config(src, out, model={"path": str(folder)},
                      render={"num_frames": 16, "height": 32, "width": 32, "batch_size": 1},
                      cluster={"backend": "inline", "max_attempts": 1})
    result = run_cli("plan", write_config(tmp_path, raw))
    assert result.returncode == 0, result.stderr
    assert f"{folder} (shape rules of WanPipeline, from its config files)" in result.stdout
    assert "5 row(s) will fail as invalid_shape, e.g. " + WAN_16 in result.stdout
    assert "(and 1 other reason(s))" in result.stdout
    cfg = validate(raw)
    render(cfg, progress=False)
    codes = [r["error_code"] for t in manifest.iter_shards(out) for r in t.to_pylist()]
    assert codes.count("invalid_shape") == 5 and codes.count(None) == 1

    # The same files in a hub cache: read with no network, at the revision asked for.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-wan" / "snapshots" / ("0" * 40)
    for name in ("model_index.json", "vae/config.json", "transformer/config.json"):
        os.makedirs(snapshot / os.path.dirname(name), exist_ok=True)
        shutil.copy(folder / name, snapshot / name)
    (cache / "models--someone--tiny-wan" / "refs").mkdir()
    (cache / "models--someone--tiny-wan" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub = known_shapes("someone/tiny-wan")
    assert hub.facts == known_shapes(str(folder)).facts
    assert "hub cache" in hub.source
    assert known_shapes("someone/tiny-wan", revision="v2").facts is None
    # Loaded as another class of the family, the rules are that class's.
    v2v = known_shapes("someone/tiny-wan", pipeline="WanVideoToVideoPipeline").facts
    assert v2v.pipeline == "WanVideoToVideoPipeline"
    counts = count_plan(open_dataset(src, []), cfg, HashSet(), preflight(cfg))
    assert (counts.invalid, counts.invalid_shape) == (5, 5)


def test_unknown_rules_are_said_and_nothing_is_counted(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", _rows({}))
    raw = tiny_config(src, str(tmp_path / "out"), model={"path": "someone/not-cached-here"},
                      render={"num_frames": 16})
    cfg = validate(raw)
    checks = preflight(cfg)
    assert checks.known["video"].facts is None and checks.known["video"].adapter is None
    assert "not in this machine's hub cache" in checks.known["video"].source
    assert count_plan(open_dataset(src, []), cfg, HashSet(), checks).invalid == 0


def test_plan_imports_neither_torch_nor_diffusers(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", _rows({"bad": {"num_frames": 12}}))
    config = write_config(tmp_path, tiny_config(src, str(tmp_path / "out"),
                                                model={"path": "tiny:wan"},
                                                render={"num_frames": 5}))
    probe = ("import sys; from jobs.cli import main; code = main(['plan', sys.argv[1]]); "
             "assert code == 0; "
             "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), "
             "'plan imported a model library'")
    result = run_cli_python(probe, config)
    assert result.returncode == 0, result.stderr
    assert "1 row(s) will fail as invalid_shape" in result.stdout


def run_cli_python(code: str, *args: str):
    import subprocess
    import sys

    from helpers import REPO

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


# -- an output that is a file ---------------------------------------------------------------

def test_an_output_that_is_a_file_is_refused_in_one_line(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", _rows({}))
    afile = tmp_path / "out.mp4"
    afile.write_bytes(b"not a folder")
    config = write_config(tmp_path, tiny_config(src, str(afile)))
    result = run_cli("plan", config)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"reelfarm: output {afile} is a file, not a folder: "
                                     f"choose another output.uri (or --output)")
    with pytest.raises(OutputError, match="which is a file, not a folder"):
        check_output_is_folder(str(afile / "videos"))
    check_output_is_folder(str(tmp_path / "new" / "folder"))  # not there yet: fine


def test_render_refuses_an_output_that_is_a_file_in_the_same_line(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", _rows({}))
    afile = tmp_path / "out.mp4"
    afile.write_bytes(b"not a folder")
    config = write_config(tmp_path, tiny_config(src, str(afile),
                                                cluster={"backend": "inline"}))
    result = run_cli("render", config, "--quiet")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"reelfarm: output {afile} is a file, not a folder: "
                                     f"choose another output.uri (or --output)")
    assert afile.read_bytes() == b"not a folder"


def test_plan_counts_rows_any_stage_cannot_render_as_render_fails_them(tmp_path, ray_local):
    """A keyframe stage (Flux: sides divisible by 16) into a video stage (LTX: 8k+1 frames,
    sides divisible by 32): plan counts exactly the rows render fails as invalid_shape."""
    rows = [{"prompt": "fits", "num_frames": 9, "width": 32},
            {"prompt": "flux refuses", "num_frames": 9, "width": 40},
            {"prompt": "ltx refuses the frames", "num_frames": 8, "width": 32},
            {"prompt": "ltx refuses the side", "num_frames": 9, "width": 48}]
    src = write_prompts(tmp_path / "in.parquet", rows)
    cfg = validate(stages_config(src, str(tmp_path / "out"), keyframe="tiny:flux"))
    counts = count_plan(open_dataset(src, []), cfg, HashSet(), preflight(cfg))
    summary = render(cfg, progress=False)
    failed = {r["prompt"]: r for r in read_manifest(tmp_path / "out")
              if r["error_code"] == "invalid_shape"}
    assert counts.invalid_shape == len(failed) == summary.failed == 3
    # Each is failed by the stage that would refuse it, before any stage renders it: no
    # keyframe is made for a video LTX would refuse.
    assert {p: r["failed_stage"] for p, r in failed.items()} == {
        "flux refuses": "keyframe", "ltx refuses the frames": "video",
        "ltx refuses the side": "video"}
    assert all([(s["name"], s["attempts"]) for s in r["stages"]] == [(r["failed_stage"], 0)]
               and r["artifacts"] == [] for r in failed.values())
    assert len(os.listdir(tmp_path / "out" / "stages" / "keyframe")) == 1
