"""Wan 2.1 (DiT, flow matching): text-to-video, image-to-video and video-to-video.

Wan renders 4k+1 frames at sides divisible by 16. Its I2V pipeline takes one image per call,
so it renders one row per call. Its V2V pipeline takes the frame count from the input video.
Unlike text-to-video, both clean prompts with ftfy unguarded: it must be installed.
"""

from __future__ import annotations

from rendering.pipelines import tiny_parts
from rendering.pipelines.base import Adapter


class WanTextToVideo(Adapter):
    pipeline = "WanPipeline"
    family = "wan"


class WanImageToVideo(Adapter):
    pipeline = "WanImageToVideoPipeline"
    family = "wan"
    requires = ("image",)
    max_batch = 1


class WanVideoToVideo(Adapter):
    pipeline = "WanVideoToVideoPipeline"
    family = "wan"
    requires = ("video",)
    takes_strength = True
    takes_num_frames = False


ADAPTERS = (WanTextToVideo, WanImageToVideo, WanVideoToVideo)


def _transformer(in_channels: int = 16, **extra):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **extra)


def _components() -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return dict(tokenizer=tiny_parts.t5_tokenizer(), text_encoder=tiny_parts.umt5_encoder(),
                vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _text_to_video():
    from diffusers import WanPipeline

    return WanPipeline(transformer=_transformer(), **_components())


def _image_to_video():
    from diffusers import WanImageToVideoPipeline

    image_encoder, image_processor = tiny_parts.clip_vision_encoder()
    # Wan 2.1 I2V: the noise, a 4-channel first-frame mask and the image's 16 latent channels
    # in; CLIP's image tokens through extra key/value projections (inner dim 2 heads x 12).
    transformer = _transformer(in_channels=16 + 4 + 16, image_dim=32, added_kv_proj_dim=24)
    return WanImageToVideoPipeline(transformer=transformer, image_encoder=image_encoder,
                                   image_processor=image_processor, **_components())


def _video_to_video():
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline(transformer=_transformer(), **_components())


TINY = {"wan": _text_to_video, "wan-i2v": _image_to_video, "wan-v2v": _video_to_video}
