"""I2VGenXL (UNet3D, image-to-video guided by a prompt).

It samples the image's VAE latent from torch's global RNG, not from the call's generator, so
the worker seeds that RNG per call and it renders one row per call. Its prompt is read from the
text encoder's penultimate layer (diffusers' default ``clip_skip=1``, as I2VGen-XL's own code
encodes it): diffusers reaches that layer's final norm through ``text_encoder.text_model``, which
transformers' flattened CLIPTextModel (5.x) no longer has, so ``prepare`` points it at the
encoder's own ``final_layer_norm``. ``target_fps`` is a micro-condition left at its default: a
row's fps only sets the encoder's rate.
"""

from __future__ import annotations

from types import SimpleNamespace

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter


class I2VGenXL(Adapter):
    pipeline = "I2VGenXLPipeline"
    family = "i2vgenxl"
    requires = ("image",)
    global_rng = True

    @classmethod
    def prepare(cls, pipe) -> None:
        encoder = pipe.text_encoder
        if not hasattr(encoder, "text_model"):  # transformers 5 moved its parts up a level
            encoder.text_model = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)


ADAPTERS = (I2VGenXL,)


# The tiny twin's UNet config: the builder uses it, and ``reelfarm plan`` reads its shape facts
# from it and the VAE's without building anything.
_UNET = dict(
    block_out_channels=(8, 16), layers_per_block=1, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
    attention_head_dim=4, num_attention_heads=None, norm_num_groups=2)
# What of tiny_components.sd_vae's config the shape rule reads: four blocks, 8x downscale
# (tests/test_jobs/input/test_plan_shapes.py checks it against the built VAE).
_SD_VAE_SHAPE = {"block_out_channels": (8, 8, 8, 8)}


def _image_to_video():
    from diffusers import DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet

    tokenizer = tiny_components.clip_tokenizer()
    image_encoder, feature_extractor = tiny_components.clip_vision_encoder()
    unet = I2VGenXLUNet(**_UNET)
    vae = tiny_components.sd_vae(sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return I2VGenXLPipeline(vae=vae, text_encoder=tiny_components.clip_text_encoder(tokenizer),
                            tokenizer=tokenizer, image_encoder=image_encoder,
                            feature_extractor=feature_extractor, unet=unet, scheduler=scheduler)


TINY = {"i2vgenxl": _image_to_video}
TINY_CONFIGS = {"i2vgenxl": ("I2VGenXLPipeline", {"vae": _SD_VAE_SHAPE, "unet": _UNET})}
