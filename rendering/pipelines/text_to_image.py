"""Text-to-image: Stable Diffusion 1.x/2.x and SDXL (UNet), and Flux (DiT, flow matching).

Each row becomes one picture, a keyframe for a video stage after it, so the row's num_frames
is not theirs and any count is accepted. All three take a list of generators, one per picture.
SD and SDXL refuse sides not divisible by 8 (their own check, whatever the VAE) and render any
multiple exactly. Flux packs 2x2 latents into one token, so its sides must divide by twice the
VAE's 8x; it only warns about other sides, then renders a smaller picture (or crashes on a
side under 16). Flux's guidance_scale is the distilled guidance its transformer is
conditioned on (ignored by models without it, such as schnell); its negative prompt works only
with a second, "true" guidance scale a row has no column for, so it takes none. SD 1.x/2.x
models published with a safety checker black out each picture it flags and say which
(``nsfw_content_detected``); SDXL and Flux have no checker.
"""

from __future__ import annotations

import copy
from typing import Mapping

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter
from rendering.pipelines.shapes import ShapeFacts

class _TextToImage(Adapter):
    family = "text_to_image"
    makes = "image"
    takes_num_frames = False


class _StableDiffusion(_TextToImage):
    checked_side_multiple = 8  # SD's and SDXL's check_inputs refuse sides not divisible by 8


class StableDiffusion(_StableDiffusion):
    pipeline = "StableDiffusionPipeline"
    safety_flag = "nsfw_content_detected"  # None in its output when it loads without a checker


class StableDiffusionXL(_StableDiffusion):
    pipeline = "StableDiffusionXLPipeline"


class Flux(_TextToImage):
    pipeline = "FluxPipeline"
    takes_negative_prompt = False

    @classmethod
    def facts(cls, temporal: int | None, vae_spatial: int | None,
              denoiser: Mapping) -> ShapeFacts:
        # The pipeline packs 2x2 latents per token (its transformer's own patch size is 1).
        return super().facts(temporal, 2 * int(vae_spatial or 1), denoiser)


ADAPTERS = (StableDiffusion, StableDiffusionXL, Flux)


# The tiny twins' denoiser and VAE configs: the builders use them, and ``reelfarm plan`` reads
# their shape facts from them without building anything.
_UNET = dict(
    block_out_channels=(8, 16), layers_per_block=1, sample_size=4, in_channels=4,
    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=2)
# SDXL reads the two text encoders' hidden states side by side (2 x 32) and adds the second
# one's pooled output (32) to six size and crop conditions (6 x 8).
_XL_UNET = dict(
    _UNET, cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
# What of tiny_components.sd_vae's config the shape rule reads: four blocks, 8x downscale
# (tests/test_jobs/input/test_plan_shapes.py checks it against the built VAE).
_SD_VAE_SHAPE = {"block_out_channels": (8, 8, 8, 8)}
# tiny:sd-checked's safety checker flags a picture whose embedding's cosine with its concept is
# above this: about the median over the tiny SD's 32x32 pictures (0.246 to 0.298, measured on
# seeds 0-63), so it flags about half of them.
_CHECKED_THRESHOLD = 0.274
# Flux's VAE layout: the real 8x downscale, no quant convs, a latent shift; its transformer
# takes the 4 latent channels of 2x2 packed latents, and its rotary axes sum to the head size.
_FLUX_VAE = dict(
    block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4, sample_size=32, norm_num_groups=2, use_quant_conv=False,
    use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=True, axes_dims_rope=(4, 4, 8))


def _stable_diffusion():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_components.clip_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=tiny_components.sd_vae(sample_size=32),
        text_encoder=tiny_components.clip_text_encoder(tokenizer),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**_UNET), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _stable_diffusion_checked():
    """tiny:sd with a safety checker that flags about half its pictures, depending on the seed
    (the tests of quality.on_unsafe find seeds of either kind); its other weights are tiny:sd's."""
    from diffusers import StableDiffusionPipeline

    pipe = _stable_diffusion()
    checker, processor = tiny_components.sd_safety_checker(_CHECKED_THRESHOLD)
    return StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker,
                                      "feature_extractor": processor})


def _stable_diffusion_xl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_components.clip_tokenizer()
    text_encoder = tiny_components.clip_text_encoder(tokenizer)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=tiny_components.sd_vae(sample_size=32), text_encoder=text_encoder,
        text_encoder_2=CLIPTextModelWithProjection(copy.deepcopy(text_encoder.config)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**_XL_UNET),
        scheduler=scheduler)


def _flux():
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)

    tokenizer = tiny_components.clip_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=AutoencoderKL(**_FLUX_VAE),
        text_encoder=tiny_components.clip_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=tiny_components.t5_encoder(), tokenizer_2=tiny_components.t5_tokenizer(),
        transformer=FluxTransformer2DModel(**_FLUX_TRANSFORMER))


TINY = {"sd": _stable_diffusion, "sd-checked": _stable_diffusion_checked,
        "sdxl": _stable_diffusion_xl, "flux": _flux}
TINY_CONFIGS = {
    "sd": ("StableDiffusionPipeline", {"vae": _SD_VAE_SHAPE, "unet": _UNET}),
    "sd-checked": ("StableDiffusionPipeline", {"vae": _SD_VAE_SHAPE, "unet": _UNET}),
    "sdxl": ("StableDiffusionXLPipeline", {"vae": _SD_VAE_SHAPE, "unet": _XL_UNET}),
    "flux": ("FluxPipeline", {"vae": _FLUX_VAE, "transformer": _FLUX_TRANSFORMER}),
}
