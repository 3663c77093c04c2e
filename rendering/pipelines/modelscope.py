"""ModelScope / zeroscope (UNet3D): text-to-video, and video-to-video with a strength.

VideoToVideoSD takes its frame count and size from the input video (it has no num_frames,
height or width arguments) and crashes on a list of generators or a batch of more than one, so
it renders one row per call.
"""

from __future__ import annotations

from rendering.contract import Task
from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter


class TextToVideoSD(Adapter):
    pipeline = "TextToVideoSDPipeline"
    family = "modelscope"


class VideoToVideoSD(Adapter):
    pipeline = "VideoToVideoSDPipeline"
    family = "modelscope"
    requires = ("video",)
    takes_strength = True
    takes_num_frames = False
    generator_list = False

    @classmethod
    def call_kwargs(cls, tasks: list[Task], media: list[dict], generators: list) -> dict:
        kwargs = super().call_kwargs(tasks, media, generators)
        del kwargs["height"], kwargs["width"]
        return kwargs


ADAPTERS = (TextToVideoSD, VideoToVideoSD)


# The tiny twins' UNet config: the builder uses it, and ``reelfarm plan`` reads their shape
# facts from it and the VAE's without building anything.
_UNET = dict(
    block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
    out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=2)
# What of tiny_components.sd_vae's config the shape rule reads: four blocks, 8x downscale
# (tests/test_jobs/input/test_plan_shapes.py checks it against the built VAE).
_SD_VAE_SHAPE = {"block_out_channels": (8, 8, 8, 8)}


def _components() -> dict:
    from diffusers import DDIMScheduler, UNet3DConditionModel

    tokenizer = tiny_components.clip_tokenizer()
    unet = UNet3DConditionModel(**_UNET)
    vae = tiny_components.sd_vae(sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=False)
    return dict(vae=vae, text_encoder=tiny_components.clip_text_encoder(tokenizer),
                tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def _text_to_video():
    from diffusers import TextToVideoSDPipeline

    return TextToVideoSDPipeline(**_components())


def _video_to_video():
    from diffusers import VideoToVideoSDPipeline

    return VideoToVideoSDPipeline(**_components())


TINY = {"modelscope": _text_to_video, "modelscope-v2v": _video_to_video}
_TINY_CONFIGS = {"vae": _SD_VAE_SHAPE, "unet": _UNET}
TINY_CONFIGS = {"modelscope": ("TextToVideoSDPipeline", _TINY_CONFIGS),
                "modelscope-v2v": ("VideoToVideoSDPipeline", _TINY_CONFIGS)}
