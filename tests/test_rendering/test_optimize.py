"""The pipeline's speed and memory options: applied where the model has them, refused with a
message naming the option where it does not, and part of the output's fingerprint."""

from __future__ import annotations

import pytest
from helpers import prompts, tiny_config, write_prompts

from jobs.config import ConfigError, fingerprint, load_config, validate
from jobs.driver import render
from jobs.run.workers import worker_spec
from rendering.pipelines.load import load_pipeline
from rendering.contract import ModelSpec, OptimizeSpec


def test_cache_attention_and_vae_options_are_applied_to_a_dit():
    opt = OptimizeSpec(attention_backend="native", first_block_cache_threshold=0.2,
                       vae_slicing=True, vae_tiling=True)
    pipe = load_pipeline(ModelSpec("tiny:wan"), "cpu", opt)
    backends = {str(m.processor._attention_backend) for m in pipe.transformer.modules()
                if hasattr(m, "processor")}
    assert backends == {"AttentionBackendName.NATIVE"}
    assert pipe.transformer.is_cache_enabled
    assert pipe.vae.use_slicing and pipe.vae.use_tiling


def test_compiling_repeated_blocks_compiles_each_transformer_block():
    pipe = load_pipeline(ModelSpec("tiny:wan"), "cpu", OptimizeSpec(compile="repeated_blocks"))
    blocks = list(pipe.transformer.blocks)
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)


@pytest.mark.parametrize("opt, message", [
    (OptimizeSpec(first_block_cache_threshold=0.1), "optimize.first_block_cache_threshold: "
                                                    "UNet3DConditionModel has no cache hooks"),
    (OptimizeSpec(compile="repeated_blocks"), "optimize.compile: UNet3DConditionModel declares "
                                              "no repeated blocks"),
    (OptimizeSpec(attention_backend="_native_math"), "optimize.attention_backend: "
                                                     "UNet3DConditionModel calls torch SDPA itself"),
])
def test_options_a_model_lacks_are_refused_by_name(opt, message):
    with pytest.raises(ValueError, match=message):
        load_pipeline(ModelSpec("tiny:modelscope"), "cpu", opt)


def test_a_job_renders_with_the_options_on(tmp_path):
    src = write_prompts(tmp_path / "prompts.parquet", prompts(2))
    cfg = validate(tiny_config(src, str(tmp_path / "out"), model={"path": "tiny:wan"},
                               render={"num_frames": 5},
                               optimize={"first_block_cache_threshold": 0.2, "vae_slicing": True},
                               cluster={"backend": "inline"}))
    assert worker_spec(cfg).optimize == OptimizeSpec(first_block_cache_threshold=0.2,
                                                     vae_slicing=True)
    assert render(cfg, progress=False).ok == 2


def test_options_are_validated_and_fingerprinted():
    base = {"input": {"uri": "in"}, "model": {"path": "tiny:wan"}, "output": {"uri": "out"}}
    with pytest.raises(ConfigError, match=r"^optimize.offload: Input should be 'none', 'model' or 'sequential'"):
        load_config(base=base, overrides=["optimize.offload=disk"])
    plain = load_config(base=base)
    cached = load_config(base=base, overrides=["optimize.first_block_cache_threshold=0.1"])
    assert fingerprint(plain) != fingerprint(cached)


@pytest.mark.gpu
def test_model_offload_on_a_gpu():
    pipe = load_pipeline(ModelSpec("tiny:wan", dtype="float16"), "cuda", OptimizeSpec(offload="model"))
    assert pipe.transformer.device.type == "cpu"  # moved to the GPU only while it runs


@pytest.mark.gpu
def test_a_cuda_worker_reports_its_peak_gpu_memory_with_each_row(tmp_path):
    """What ``ray_reelfarm_gpu_memory_peak_bytes`` shows: torch's peak allocation on the card."""
    from jobs.input.dataset import open_dataset
    from jobs.input.plan import PlanCounts, plan_rows
    from jobs.store.hashset import HashSet
    from rendering.worker import ShardRenderer

    src = write_prompts(tmp_path / "prompts.parquet", prompts(2))
    cfg = validate(tiny_config(src, str(tmp_path / "out"), cluster={"backend": "inline"}))
    planned = list(plan_rows(open_dataset(src, []), cfg, HashSet(), PlanCounts()))
    results = ShardRenderer(worker_spec(cfg)).render_shard([p.outcome for p in planned])
    peaks = {r.metrics["gpu_memory_peak_bytes"] for r in results}
    assert all(r.ok for r in results) and len(peaks) == 1 and peaks.pop() > 0
