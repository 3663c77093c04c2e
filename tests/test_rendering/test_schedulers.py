"""model.scheduler swaps the sampler of a real tiny pipeline, and what would mis-render is
refused at load with one line that says what to set."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest

from rendering.contract import ModelSpec, Task
from rendering.pipelines import adapter_for
from rendering.pipelines.load import load_pipeline, render_batch
from rendering.pipelines.schedulers import (apply_scheduler, check_scheduler,
                                            declared_scheduler_names, scheduler_names)
from rendering.pipelines.tiny import build_tiny_pipeline

FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
FRAMES = {"modelscope": 8, "wan": 5}


def load(kind: str, scheduler: str | None = None, **config):
    return load_pipeline(ModelSpec(path=f"tiny:{kind}", scheduler=scheduler,
                                   scheduler_config=tuple(config.items())), "cpu")


def render(pipe, kind: str, seed: int = 7) -> np.ndarray:
    params = dict(num_frames=FRAMES[kind], height=32, width=32, num_inference_steps=2,
                  guidance_scale=5.0, negative_prompt=None)
    task = Task("r", "r", seed, "a red fox", params)
    frames = render_batch(pipe, adapter_for(pipe), [task], [{}])
    assert frames.shape == (1, FRAMES[kind], 32, 32, 3)
    assert np.isfinite(frames).all()
    return frames


@pytest.fixture(scope="module")
def own():
    """Each tiny model's video with its own scheduler (DDIM, FlowMatchEuler shift 7)."""
    return {kind: render(load(kind), kind) for kind in FRAMES}


@pytest.mark.parametrize("config", [
    {}, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}])
def test_modelscope_dpm_solver_renders_differently_and_deterministically(own, config):
    pipe = load("modelscope", "DPMSolverMultistepScheduler", **config)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    for key, value in config.items():
        assert pipe.scheduler.config[key] == value
    frames = render(pipe, "modelscope")
    assert not np.array_equal(frames, own["modelscope"])  # the swap took effect
    np.testing.assert_array_equal(frames, render(pipe, "modelscope"))


@pytest.mark.parametrize("scheduler, config", [
    ("UniPCMultistepScheduler", {**FLOW, "flow_shift": 3.0}),
    ("DPMSolverMultistepScheduler", {**FLOW, "flow_shift": 3.0}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
])
def test_wan_takes_flow_schedulers(own, scheduler, config):
    pipe = load("wan", scheduler, **config)
    assert type(pipe.scheduler).__name__ == scheduler
    frames = render(pipe, "wan")
    assert not np.array_equal(frames, own["wan"])
    np.testing.assert_array_equal(frames, render(pipe, "wan"))


def test_the_model_shift_carries_across_its_two_names(caplog):
    """FlowMatch* call it ``shift``, flow-sigma solvers ``flow_shift``; an unset one is carried
    from the model rather than left at 1."""
    with caplog.at_level(logging.INFO, logger=SCHEDULERS_LOG):
        pipe = load("wan", "UniPCMultistepScheduler", **FLOW)
    assert pipe.scheduler.config.flow_shift == 7.0  # tiny Wan's FlowMatchEuler has shift=7
    assert "shift (as flow_shift)" in swap_lines(caplog)[0]
    explicit = load("wan", "UniPCMultistepScheduler", **FLOW, flow_shift=7.0)
    np.testing.assert_array_equal(render(pipe, "wan"), render(explicit, "wan"))
    # A published Wan ships UniPC set up for flow: other solvers inherit that setup as is.
    apply_scheduler(pipe, "UniPCMultistepScheduler", {"flow_shift": 3.0})
    apply_scheduler(pipe, "DPMSolverMultistepScheduler", {})
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.use_flow_sigmas,
            pipe.scheduler.config.flow_shift) == ("flow_prediction", True, 3.0)
    apply_scheduler(pipe, "FlowMatchEulerDiscreteScheduler", {})
    assert pipe.scheduler.config.shift == 3.0


SCHEDULERS_LOG = "rendering.pipelines.schedulers"
# The tiny CogVideoX's CogVideoXDDIMScheduler as DPMSolverMultistepScheduler.
COGVIDEOX_TO_DPM = (
    "model.scheduler DPMSolverMultistepScheduler: kept the model's beta_end, beta_schedule, "
    "beta_start, num_train_timesteps, prediction_type, rescale_betas_zero_snr, steps_offset, "
    "timestep_spacing; dropped clip_sample, set_alpha_to_one, snr_shift_scale "
    "(DPMSolverMultistepScheduler has no such settings)")


def swap_lines(caplog, level: int = logging.INFO) -> list[str]:
    """What the schedulers module logged at ``level`` or above."""
    return [r.getMessage() for r in caplog.records
            if r.name == SCHEDULERS_LOG and r.levelno >= level]


def test_a_swap_keeps_the_model_settings_the_class_has_and_names_those_it_drops(caplog):
    """The settings its scheduler config sets (as the published one, its scaled-linear betas
    from 0.00085, not DPMSolverMultistepScheduler's linear ones from 0.0001)."""
    own = build_tiny_pipeline("cogvideox").scheduler.config
    with caplog.at_level(logging.INFO, logger=SCHEDULERS_LOG):
        pipe = load("cogvideox", "DPMSolverMultistepScheduler")
    assert swap_lines(caplog) == swap_lines(caplog, logging.WARNING) == [COGVIDEOX_TO_DPM]
    kept = COGVIDEOX_TO_DPM.split("kept the model's ")[1].split(";")[0].split(", ")
    assert {k: pipe.scheduler.config[k] for k in kept} == {k: own[k] for k in kept}
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    # The twin built in code swaps as its saved copy does (there every key is explicit).
    saved = load_pipeline(ModelSpec("tiny:cogvideox", dtype="bfloat16",
                                    scheduler="DPMSolverMultistepScheduler"), "cpu")
    assert {k: v for k, v in saved.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}


def test_a_key_the_model_leaves_out_takes_the_new_class_default_as_diffusers_recipes_do():
    """ModelScope's scheduler config sets no timestep_spacing (DDIM's default is "leading"):
    DPMSolver keeps its own "linspace", as diffusers' ModelScope recipe renders."""
    assert "timestep_spacing" in build_tiny_pipeline("modelscope").scheduler.config[
        "_use_default_values"]
    assert load("modelscope", "DPMSolverMultistepScheduler").scheduler.config \
        .timestep_spacing == "linspace"


def test_an_override_is_the_users_not_the_models(caplog):
    with caplog.at_level(logging.INFO, logger=SCHEDULERS_LOG):
        pipe = load("cogvideox", "DPMSolverMultistepScheduler", timestep_spacing="linspace")
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    assert swap_lines(caplog) == [COGVIDEOX_TO_DPM.replace(", timestep_spacing;", ";")]


FIX = "{prediction_type: flow_prediction, use_flow_sigmas: true, flow_shift: 7.0}"
REFUSALS = [
    ("modelscope", "DPMSolverMultiStepScheduler", {},
     "model.scheduler: 'DPMSolverMultiStepScheduler' is not a diffusers scheduler (did you mean "
     "DPMSolverMultistepScheduler?); list them with: python -m rendering.pipelines.schedulers"),
    ("modelscope", "DDIM", {}, "'DDIM' is not a diffusers scheduler (did you mean DDIMScheduler?)"),
    ("modelscope", "UNet3DConditionModel", {},
     "'UNet3DConditionModel' is not a diffusers scheduler;"),
    ("modelscope", "DPMSolverMultistepScheduler", {"use_karas_sigmas": True},
     "model.scheduler_config: DPMSolverMultistepScheduler has no setting 'use_karas_sigmas' "
     "(did you mean use_karras_sigmas?)"),
    ("wan", "FlowMatchEulerDiscreteScheduler", {"flow_shift": 3.0},
     "FlowMatchEulerDiscreteScheduler has no setting 'flow_shift' (did you mean shift?)"),
    ("modelscope", "DDIMScheduler", {"qqq": 1}, "has no setting 'qqq' (it has: beta_end, "),
    ("modelscope", "DPMSolverMultistepScheduler", {"algorithm_type": "nope"},
     "model.scheduler: DPMSolverMultistepScheduler cannot be built from the model's scheduler "
     "config and model.scheduler_config: NotImplementedError: nope is not implemented"),
    ("wan", "UniPCMultistepScheduler", {},
     "model.scheduler: WanPipeline is a flow-matching model but UniPCMultistepScheduler as "
     f"configured expects epsilon with use_flow_sigmas=false; set model.scheduler_config: {FIX}"),
    ("wan", "DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"},
     "expects flow_prediction with use_flow_sigmas=false; set model.scheduler_config: {prediction"),
    ("wan", "UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 5.0},
     "expects epsilon with use_flow_sigmas=true; set model.scheduler_config: {prediction_type: "
     "flow_prediction, use_flow_sigmas: true, flow_shift: 5.0}"),
    ("wan", "EulerDiscreteScheduler", {},
     "model.scheduler: WanPipeline is a flow-matching model and EulerDiscreteScheduler cannot "
     "drive one; use a FlowMatch* scheduler such as FlowMatchEulerDiscreteScheduler, or "
     f"UniPCMultistepScheduler / DPMSolverMultistepScheduler with model.scheduler_config: {FIX}"),
    ("modelscope", "FlowMatchEulerDiscreteScheduler", {},
     "model.scheduler: TextToVideoSDPipeline predicts epsilon (a noise-schedule model) and "
     "FlowMatchEulerDiscreteScheduler is a flow-matching scheduler; use one such as "
     "DPMSolverMultistepScheduler, UniPCMultistepScheduler or EulerDiscreteScheduler"),
    ("modelscope", "UniPCMultistepScheduler", {**FLOW, "flow_shift": 3.0},
     "model.scheduler: TextToVideoSDPipeline predicts epsilon (a noise-schedule model) but "
     "UniPCMultistepScheduler as configured expects flow_prediction with use_flow_sigmas=true; "
     "drop prediction_type and use_flow_sigmas from model.scheduler_config"),
    ("modelscope", "DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"},
     "model.scheduler_config: DPMSolverMultistepScheduler would read prediction_type "
     "v_prediction but TextToVideoSDPipeline predicts epsilon (per its scheduler config); drop it"),
    ("modelscope", "KarrasVeScheduler", {},
     "KarrasVeScheduler is not a sampler for epsilon, v-prediction or flow-matching models"),
]


@pytest.mark.parametrize("kind, scheduler, config, message", REFUSALS,
                         ids=[f"{r[0]}-{r[1]}-{'-'.join(r[2]) or 'default'}" for r in REFUSALS])
def test_refusals_name_what_to_set(kind, scheduler, config, message):
    with pytest.raises(ValueError) as caught:
        load(kind, scheduler, **config)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("scheduler, package", [("DPMSolverSDEScheduler", "torchsde"),
                                                ("LMSDiscreteScheduler", "scipy")])
def test_a_scheduler_whose_package_is_missing_is_refused(scheduler, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here, so {scheduler} loads")
    with pytest.raises(ValueError) as caught:
        load("modelscope", scheduler)
    assert str(caught.value) == (f"model.scheduler: {scheduler} needs {package}, which is not "
                                 f"installed on the worker (pip install {package})")


def test_a_refused_swap_leaves_the_pipeline_as_it_was():
    pipe = build_tiny_pipeline("wan")
    before = pipe.scheduler
    with pytest.raises(ValueError):
        apply_scheduler(pipe, "DDIMScheduler", {})
    assert pipe.scheduler is before


def test_check_scheduler_needs_no_model():
    assert check_scheduler("UniPCMultistepScheduler", FLOW).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(ValueError, match="has no setting 'flow_sift' .did you mean flow_shift"):
        check_scheduler("UniPCMultistepScheduler", {"flow_sift": 3.0})


def test_a_job_renders_with_the_configured_scheduler_and_refuses_a_mismatch_in_one_line(tmp_path):
    import json

    from helpers import prompts, run_cli, write_config

    config = write_config(tmp_path, rows=prompts(2), cluster={"backend": "inline"})
    ok = run_cli("render", str(config), "--set", "model.scheduler=DPMSolverMultistepScheduler",
                 "--set", "model.scheduler_config={use_karras_sigmas: true}")
    assert ok.returncode == 0, ok.stderr
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["settings"]["model.scheduler"] == "DPMSolverMultistepScheduler"
    assert job["settings"]["model.scheduler_config"] == {"use_karras_sigmas": True}

    refused = run_cli("render", str(config), "--output", str(tmp_path / "wan"),
                      "--set", "model.path=tiny:wan", "--set", "render.num_frames=5",
                      "--set", "model.scheduler=EulerDiscreteScheduler")
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("reelfarm:")]
    assert len(errors) == 1 and "flow-matching model" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr

    # The refused run committed and stored nothing: the corrected settings take the output
    # over (and say so) instead of being refused as "rendered with other settings".
    fixed = run_cli("render", str(config), "--output", str(tmp_path / "wan"),
                    "--set", "model.path=tiny:wan", "--set", "render.num_frames=5",
                    "--set", "model.scheduler=FlowMatchEulerDiscreteScheduler")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "holds no committed or stored row" in fixed.stderr
    job = json.loads((tmp_path / "wan" / "job.json").read_text())
    assert job["settings"]["model.scheduler"] == "FlowMatchEulerDiscreteScheduler"
    # Once it holds rows, other settings are refused again.
    again = run_cli("render", str(config), "--output", str(tmp_path / "wan"),
                    "--set", "model.path=tiny:wan", "--set", "render.num_frames=5")
    assert again.returncode == 1 and "rendered with other settings" in again.stderr


def test_the_names_read_without_torch_are_diffusers_own():
    assert declared_scheduler_names() == set(scheduler_names())


def test_plan_refuses_an_unknown_scheduler_before_any_worker_or_torch(tmp_path):
    from helpers import prompts, run_cli, write_config

    config = write_config(tmp_path, rows=prompts(2))
    for command in ("plan", "render"):
        result = run_cli(command, str(config), "--set", "model.scheduler=DPMSolverMultistepSchedular")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            "reelfarm: model.scheduler: 'DPMSolverMultistepSchedular' is not a diffusers scheduler "
            "(did you mean DPMSolverMultistepScheduler?); list them with: python -m "
            "rendering.pipelines.schedulers (got 'DPMSolverMultistepSchedular')")
    assert not (tmp_path / "out").exists()  # refused before the output was touched
