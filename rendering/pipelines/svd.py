"""Stable Video Diffusion (UNet, image-to-video): one image in, a clip that starts from it.

SVD takes no prompt: the image is its only conditioning, through CLIP (always at 224x224) and
the VAE. Its guidance ramps over the frames from ``min_guidance_scale`` (1) on the first to
``max_guidance_scale`` on the last: the row's guidance_scale is that maximum. One frame is
refused: the ramp is then just the minimum, which turns guidance off halfway through the call
and crashes it. ``fps`` and ``motion_bucket_id`` are micro-conditions the model was trained
with; they keep the published defaults, since a row's fps only sets the encoder's rate.
Videos decode in one chunk of all their frames (the default).
"""

from __future__ import annotations

from rendering.contract import Task
from rendering.pipelines.base import Adapter


class StableVideoDiffusion(Adapter):
    pipeline = "StableVideoDiffusionPipeline"
    family = "svd"
    takes_prompt = False
    takes_negative_prompt = False
    requires = ("image",)
    min_frames = 2

    @classmethod
    def call_kwargs(cls, tasks: list[Task], media: list[dict], generators: list) -> dict:
        kwargs = super().call_kwargs(tasks, media, generators)
        kwargs["max_guidance_scale"] = kwargs.pop("guidance_scale")
        return kwargs


ADAPTERS = (StableVideoDiffusion,)


def _image_encoder():
    """CLIP at SVD's fixed 224x224 input, cut into 7x7 patches so it stays tiny."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, intermediate_size=37, patch_size=32))
    return encoder, CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})


# The tiny twin's UNet and VAE configs: the builder uses them, and ``reelfarm plan`` reads
# their shape facts from them without building anything. Its blocks normalise in groups of 32
# channels, so 32 is the narrowest width.
_UNET = dict(
    block_out_channels=(32, 32), layers_per_block=1, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    cross_attention_dim=32, num_attention_heads=2, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=3 * 8)
# Four blocks give the real model's 8x spatial downsampling, which keeps latents small; 64
# channels, as its encoder normalises groups of 32 and a 1x1 latent (8-pixel sides) needs two
# values a group.
_VAE = dict(block_out_channels=(64, 64, 64, 64), down_block_types=["DownEncoderBlock2D"] * 4,
            latent_channels=4, layers_per_block=1)


def _image_to_video():
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler,
                           StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel)

    unet = UNetSpatioTemporalConditionModel(**_UNET)
    vae = AutoencoderKLTemporalDecoder(**_VAE)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
        sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True)
    image_encoder, feature_extractor = _image_encoder()
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=scheduler, feature_extractor=feature_extractor)


TINY = {"svd": _image_to_video}
TINY_CONFIGS = {"svd": ("StableVideoDiffusionPipeline", {"vae": _VAE, "unet": _UNET})}
