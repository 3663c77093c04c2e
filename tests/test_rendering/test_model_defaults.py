"""What a model's own configs decide is kept when reelfarm drives it: I2VGen-XL reads its prompt
from the penultimate CLIP layer, and LTX batches exactly where its VAE adds no shared noise.
Real tiny twins on CPU, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rendering.contract import ModelSpec, Task
from rendering.pipelines import ADAPTERS, adapter_for
from rendering.pipelines.load import load_pipeline, render_batch


def task(seed: int, prompt: str, num_frames: int) -> Task:
    params = dict(num_frames=num_frames, height=32, width=32, num_inference_steps=2,
                  guidance_scale=5.0, negative_prompt=None)
    return Task(f"row-{seed}", f"row-{seed}", seed, prompt, params)


def image(red: int) -> dict:
    return {"image": Image.new("RGB", (32, 32), (red, 90, 200))}


# -- I2VGen-XL: the penultimate CLIP layer ---------------------------------------------------

def _text_layer(pipe, prompt: str, layer: int) -> torch.Tensor:
    """The text encoder's hidden states after ``layer``, through its final norm."""
    ids = pipe.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    return pipe.text_encoder.final_layer_norm(states[layer])


def test_i2vgenxl_reads_its_prompt_from_the_penultimate_clip_layer():
    pipe = load_pipeline(ModelSpec("tiny:i2vgenxl"), "cpu")
    seen = []  # what the UNet is given to attend to: [negative, prompt] under guidance
    pipe.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    render_batch(pipe, adapter_for(pipe), [task(7, "a red fox", 4)], [image(200)])

    with torch.inference_mode():
        penultimate, last = (torch.cat([_text_layer(pipe, p, layer) for p in ("", "a red fox")])
                             for layer in (-2, -1))
    torch.testing.assert_close(seen[0], penultimate, rtol=0, atol=0)
    assert not torch.allclose(seen[0], last, atol=1e-3)


# -- LTX: batching by VAE version ------------------------------------------------------------

# What decides it in each published VAE config (diffusers' scripts/convert_ltx_to_diffusers.py),
# and the rows per call then allowed at render.batch_size 4: text-to-video, image-to-video.
PUBLISHED_VAES = {
    "0.9.0": ({"timestep_conditioning": False, "decoder_inject_noise": (False,) * 5}, (4, 4)),
    "0.9.1": ({"timestep_conditioning": True,
               "decoder_inject_noise": (True, True, True, False)}, (1, 1)),
    "0.9.5": ({"timestep_conditioning": True, "decoder_inject_noise": (False,) * 4}, (4, 1)),
    "0.9.7": ({"timestep_conditioning": True, "decoder_inject_noise": (False,) * 4}, (4, 1)),
}


@pytest.mark.parametrize("version", PUBLISHED_VAES)
def test_ltx_batches_by_what_its_vae_draws_at_decode(version):
    vae, rows = PUBLISHED_VAES[version]
    adapters = [ADAPTERS[name].for_vae(vae) for name in ("LTXPipeline", "LTXImageToVideoPipeline")]
    assert tuple(a.batch_limit(4) for a in adapters) == rows
    # Only 0.9.1's decoder draws from torch's global RNG (seeded per row, so one row per call).
    assert {a.global_rng for a in adapters} == {version == "0.9.1"}


@pytest.mark.parametrize("kind, pipeline, limit", [
    ("ltx", None, 1), ("ltx-i2v", None, 1),
    ("ltx-0.9.0", None, 2), ("ltx-0.9.0", "LTXImageToVideoPipeline", 2)])
def test_ltx_twins_batch_as_their_vae_allows(kind, pipeline, limit):
    pipe = load_pipeline(ModelSpec(f"tiny:{kind}", pipeline=pipeline), "cpu")
    assert adapter_for(pipe).batch_limit(2) == limit


@pytest.mark.parametrize("pipeline, media", [
    (None, [{}, {}]), ("LTXImageToVideoPipeline", [image(200), image(20)])])
def test_ltx_090_batches_reproduce_byte_for_byte_and_match_single_calls(pipeline, media):
    pipe = load_pipeline(ModelSpec("tiny:ltx-0.9.0", pipeline=pipeline), "cpu")
    adapter = adapter_for(pipe)
    rows = [task(1, "a red fox in the snow", 9), task(2, "a lighthouse at dusk", 9)]
    batch = render_batch(pipe, adapter, rows, media)
    assert batch.shape == (2, 9, 32, 32, 3)
    np.testing.assert_array_equal(render_batch(pipe, adapter, rows, media), batch)
    alone = [render_batch(pipe, adapter, [row], [m])[0] for row, m in zip(rows, media)]
    # A batched call rounds differently; each row keeps its own generator and no shared noise.
    np.testing.assert_allclose(batch, np.stack(alone), rtol=0, atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)
