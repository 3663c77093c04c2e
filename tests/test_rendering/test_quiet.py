"""A render says what reelfarm has to say and nothing else: no library progress bars, no
warnings about how reelfarm calls diffusers, no Ray notice that contradicts its safety promise.
Each is checked on the real command, run as a user runs it; with --debug the libraries' own
warnings still show (the CLI only lowers their verbosity without it)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import prompts, run_cli
from helpers import write_config

from rendering.contract import ModelSpec

# What a tqdm bar prints (its rate and its bar), and the bars' names in diffusers and transformers.
_BARS = ("it/s]", "s/it]", "%|", "Loading pipeline components", "Writing model shards",
         "Loading weights")
_DTYPE_DEPRECATED = "`torch_dtype` is deprecated"
_CAST_WARNING = "should be kept in float32"
_AUTH_ON_NOTICE = "RAY_AUTH_MODE=disabled to opt out"


def _assert_quiet(result, *also_absent: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    found = [text for text in _BARS + also_absent if text in output]
    assert not found, (found, result.stderr[-3000:])


@pytest.fixture(scope="module")
def tiny_wan_folder(tmp_path_factory):
    """``make-tiny-model --kind wan``, run once: it prints no progress bar while saving."""
    folder = tmp_path_factory.mktemp("models") / "tiny-wan"
    result = run_cli("make-tiny-model", str(folder), "--kind", "wan", timeout=300)
    _assert_quiet(result)
    assert (folder / "model_index.json").exists()
    return folder


def test_make_tiny_model_prints_no_progress_bars(tiny_wan_folder):
    assert (tiny_wan_folder / "transformer").is_dir()


def test_loading_a_model_folder_in_bfloat16_prints_no_bars_and_no_dtype_warnings(tiny_wan_folder,
                                                                                  tmp_path):
    # from_pretrained: its "Loading pipeline components" bar, diffusers 0.42's FutureWarning for
    # torch_dtype=, and no cast warning: --debug leaves Python warnings and library logs on.
    config = write_config(tmp_path, rows=prompts(1))
    result = run_cli("render", config, "--debug", "--quiet",
                     "--set", "cluster.backend=inline", "--set", f"model.path={tiny_wan_folder}",
                     "--set", "model.dtype=bfloat16", "--set", "render.num_frames=5", timeout=300)
    _assert_quiet(result, _DTYPE_DEPRECATED, _CAST_WARNING)


def test_tiny_wan_in_bfloat16_renders_without_the_cast_warning(tmp_path):
    config = write_config(tmp_path, rows=prompts(1))
    result = run_cli("render", config, "--debug", "--quiet",
                     "--set", "cluster.backend=inline", "--set", "model.path=tiny:wan",
                     "--set", "model.dtype=bfloat16", "--set", "render.num_frames=5", timeout=300)
    _assert_quiet(result, _DTYPE_DEPRECATED, _CAST_WARNING)


def test_tiny_wan_in_bfloat16_keeps_its_float32_modules_as_from_pretrained_does():
    """The warning is gone because the cast is right, not because it is hidden: the modules Wan
    declares float32-only stay float32, everything else floating is bfloat16."""
    from rendering.pipelines.load import load_pipeline

    pipe = load_pipeline(ModelSpec("tiny:wan", dtype="bfloat16"), "cpu")
    keep = type(pipe.transformer)._keep_in_fp32_modules
    assert keep, "WanTransformer3DModel declares modules to keep in float32"
    dtypes = {name: p.dtype for name, p in pipe.transformer.named_parameters()}
    kept = {name for name in dtypes if any(k in name.split(".") for k in keep)}
    assert kept and {dtypes[name] for name in kept} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if name not in kept} == {torch.bfloat16}
    for name in ("vae", "text_encoder"):
        floating = {p.dtype for p in getattr(pipe, name).parameters() if p.is_floating_point()}
        assert floating == {torch.bfloat16}, (name, floating)


def test_tiny_pipelines_in_float32_and_bfloat16_are_the_same_pipeline_and_weights():
    """float32 is built in memory, bfloat16 goes through save_pretrained and from_pretrained:
    the same class and components (also when loaded as another class of the family), and the
    same weights, rounded."""
    from rendering.pipelines.load import load_pipeline

    spec = ModelSpec("tiny:wan", pipeline="WanVideoToVideoPipeline")
    full = load_pipeline(spec, "cpu")
    half = load_pipeline(ModelSpec(spec.path, dtype="bfloat16", pipeline=spec.pipeline), "cpu")
    assert type(full) is type(half) and type(half).__name__ == "WanVideoToVideoPipeline"
    assert ({k for k, v in full.components.items() if v is not None}
            == {k for k, v in half.components.items() if v is not None})
    rounded = {name: p for name, p in half.transformer.state_dict().items()}
    for name, p in full.transformer.state_dict().items():
        assert torch.equal(p.to(rounded[name].dtype), rounded[name]), name


def test_the_inline_backend_prints_no_progress_bars_and_debug_keeps_library_warnings(tmp_path):
    config = write_config(tmp_path, rows=prompts(2))
    result = run_cli("render", config, "--debug", "--quiet",
                     "--set", "cluster.backend=inline", "--set", "render.num_frames=4",
                     timeout=300)
    _assert_quiet(result, _DTYPE_DEPRECATED)
    # ModelScope's pipeline is deprecated in diffusers, which logs it on every build: with
    # --debug that log shows, so reelfarm silences bars only, not diffusers' logging.
    assert "has been deprecated" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_a_ray_render_prints_no_auth_opt_out_notice(tmp_path):
    config = write_config(tmp_path, rows=prompts(1))
    result = run_cli("render", config, "--debug", "--quiet", "--workers", "1",
                     "--set", "render.num_frames=4", env={"RAY_ADDRESS": ""}, timeout=300)
    _assert_quiet(result, _AUTH_ON_NOTICE, "Token authentication is enabled")
    assert "started a local Ray cluster on 127.0.0.1" in result.stderr


def test_only_rays_two_notices_are_dropped_and_the_auth_disabled_warning_still_shows():
    """Token auth stays on (tests/test_cluster/test_local_cluster.py checks the mode); of Ray's two auth
    notices only "enabled ... opt out" is dropped, with "Found multiple active Ray instances"
    (auto never joins those), and only while connect() runs ray.init."""
    from ray._private.authentication import authentication_token_setup as setup

    from cluster.connect import _without_ray_notices

    services = logging.getLogger("ray._private.services")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    for source in (setup.logger, services):
        source.addHandler(handler)
    try:
        with _without_ray_notices():
            setup._warn_token_auth_enabled()
            setup._warn_token_auth_disabled()
            services.warning("Found multiple active Ray instances: {'a', 'b'}.")
            services.warning("Something else about services.")
        setup._warn_token_auth_enabled()
    finally:
        for source in (setup.logger, services):
            source.removeHandler(handler)
    assert [m.split(".")[0] for m in records] == [
        "Token authentication is disabled for this Ray cluster",
        "Something else about services",
        "Token authentication is enabled for this Ray cluster"]
