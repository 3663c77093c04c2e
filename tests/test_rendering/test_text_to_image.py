"""Text-to-image pipelines (SD, SDXL, Flux) on their tiny twins, on CPU without Ray: one
picture per row, reproducible from its seed and its twin, refused at exactly the sides the
pipeline would round or crash on, and whatever the row's frame count (a later stage's)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from rendering.contract import ModelSpec, Task
from rendering.pipelines import ADAPTERS, adapter_for
from rendering.pipelines.load import load_pipeline, render_batch
from rendering.pipelines.tiny import (TINY_CONFIGS, TINY_KINDS, build_tiny_pipeline,
                                     save_tiny_pipeline, tiny_configs)
from rendering.pipelines.weights import from_pretrained

KINDS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
         "flux": "FluxPipeline"}


def test_every_image_kind_is_covered_here():
    images = {k for k in TINY_KINDS if ADAPTERS[tiny_configs(k).pipeline].makes == "image"}
    assert images == set(KINDS) | {"sd-checked"}  # tiny:sd with a safety checker: test_safety.py
    assert {kind: TINY_CONFIGS[kind][0] for kind in KINDS} == KINDS


@pytest.fixture(scope="module")
def pipes():
    return {kind: load_pipeline(ModelSpec(f"tiny:{kind}"), "cpu") for kind in KINDS}


def task(seed: int, prompt: str = "a red fox in the snow", height: int = 32, width: int = 32,
         negative_prompt: str | None = None, num_frames: int = 7) -> Task:
    """A row; its num_frames is the video stage's, which an image pipeline ignores."""
    params = dict(num_frames=num_frames, height=height, width=width, num_inference_steps=2,
                  guidance_scale=5.0, negative_prompt=negative_prompt)
    return Task(f"row-{seed}", f"row-{seed}", seed, prompt, params)


def render(pipe, *tasks: Task) -> np.ndarray:
    return render_batch(pipe, adapter_for(pipe), list(tasks), [{} for _ in tasks])


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_is_one_picture_a_row_as_rendered_alone(pipes, kind):
    pipe = pipes[kind]
    rows = [task(1), task(2, "a lighthouse at dusk", num_frames=16)]
    batch = render(pipe, *rows)
    assert batch.shape == (2, 1, 32, 32, 3) and batch.dtype == np.float32
    assert 0 <= batch.min() and batch.max() <= 1
    alone = [render(pipe, row)[0] for row in rows]
    # A batched call rounds differently (measured under 1.1e-6), each row keeps its generator.
    np.testing.assert_allclose(batch, np.stack(alone), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(render(pipe, rows[0])[0], alone[0])
    assert not np.allclose(render(pipe, task(3))[0], alone[0], atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_the_twin_is_the_same_built_again_and_saved(pipes, kind, tmp_path):
    import diffusers
    import torch

    picture = render(pipes[kind], task(5, width=48))
    np.testing.assert_array_equal(render(build_tiny_pipeline(kind), task(5, width=48)), picture)
    save_tiny_pipeline(kind, str(tmp_path))
    loaded = from_pretrained(diffusers.DiffusionPipeline, str(tmp_path), torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == KINDS[kind]
    # The same weights; on some CPUs (AVX-512 here) a loaded model's kernels round about 1e-6
    # differently from the one built in memory (SDXL, Flux), as batching does.
    np.testing.assert_allclose(render(loaded, task(5, width=48)), picture, rtol=0, atol=1e-5)


# kind, sides, what shape_problem says (None: renders exactly). Each side is rendered too: a
# refused one crashes (SD and SDXL check 8; Flux's VAE on a 2x2 latent) or comes out smaller
# (Flux rounds down to 16 with a logged warning).
SHAPES = [
    ("sd", (8, 8), None),
    ("sd", (40, 24), None),  # an odd 5x3 latent: the UNet upsamples to its skips' sizes
    ("sd", (36, 32), "StableDiffusionPipeline needs height and width divisible by 8; 36x32 is "
                     "not (nearest: 40x32)"),
    ("sdxl", (40, 16), None),
    ("sdxl", (32, 12), "StableDiffusionXLPipeline needs height and width divisible by 8; 32x12 "
                       "is not (nearest: 32x16)"),
    ("flux", (16, 48), None),
    ("flux", (40, 32), "FluxPipeline needs height and width divisible by 16; 40x32 is not "
                       "(nearest: 48x32)"),
    ("flux", (8, 16), "FluxPipeline needs height and width divisible by 16; 8x16 is not "
                      "(nearest: 16x16)"),
]


@pytest.mark.parametrize("kind, sides, message", SHAPES)
def test_refused_sides_are_exactly_those_it_would_not_render(pipes, kind, sides, message):
    pipe = pipes[kind]
    adapter = adapter_for(pipe)
    facts = adapter.facts_from_configs(TINY_CONFIGS[kind][1])
    assert facts == adapter.facts_from_pipe(pipe)
    for num_frames in (1, 2, 16, 77):
        assert adapter.shape_problem(pipe, num_frames, *sides) == message
        assert adapter.shape_problem(facts, num_frames, *sides) == message
    if message is None:
        assert render(pipe, task(1, height=sides[0], width=sides[1])).shape == (1, 1, *sides, 3)
    else:
        with pytest.raises((ValueError, RuntimeError)):  # a crash, or the shape check's
            render(pipe, task(1, height=sides[0], width=sides[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_negative_prompts_reach_the_pipelines_that_take_them(pipes, kind):
    pipe = pipes[kind]
    adapter = adapter_for(pipe)
    plain, negative = render(pipe, task(1)), render(pipe, task(1, negative_prompt="blurry"))
    # Flux's needs a true_cfg_scale a row has none of: it is left out of the call.
    assert adapter.takes_negative_prompt == (kind != "flux")
    assert np.array_equal(plain, negative) != adapter.takes_negative_prompt
    assert adapter.makes == "image" and not adapter.takes_num_frames


def test_published_vaes_give_what_their_pipelines_compute():
    """SD 1.5's, SDXL's and Flux's VAEs downscale 8x: sides of 8 for SD and SDXL (and their
    own check of 8 holds whatever the VAE), 16 for Flux. Built on the meta device."""
    import diffusers
    import torch

    published = dict(block_out_channels=[128, 256, 512, 512],
                     down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4)
    two_blocks = dict(published, block_out_channels=[128, 256],
                      down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2)
    cases = [("StableDiffusionPipeline", published, 8), ("StableDiffusionXLPipeline", published, 8),
             ("FluxPipeline", dict(published, latent_channels=16), 16),
             ("StableDiffusionPipeline", two_blocks, 8), ("FluxPipeline", two_blocks, 4)]
    for pipeline, vae, multiple in cases:
        cls = getattr(diffusers, pipeline)
        components = {p: None for p in inspect.signature(cls.__init__).parameters
                      if p != "self"}
        with torch.device("meta"):
            components["vae"] = diffusers.AutoencoderKL(**vae)
        pipe = cls(**components)
        adapter = ADAPTERS[pipeline]
        facts = adapter.facts_from_configs({"vae": vae})
        assert facts == adapter.facts_from_pipe(pipe)
        assert facts.side_multiple == multiple, pipeline


def test_a_flux_prompt_counts_as_cut_only_past_what_t5_reads(pipes):
    from rendering.pipelines.load import prompts_truncated

    words = lambda n: " ".join(["fox"] * n)  # noqa: E731 - at least a token a word
    limit = inspect.signature(pipes["flux"].__call__).parameters["max_sequence_length"].default
    # Past CLIP's 77 tokens but within T5's limit: the sequence the model attends to is whole.
    assert prompts_truncated(pipes["flux"], [words(100), words(limit + 10)]) == [False, True]
    assert prompts_truncated(pipes["sd"], [words(100)]) == [True]  # CLIP alone reads 77
