"""Wan 2.1 (DiT, flow matching): text-to-video, image-to-video and video-to-video.

Wan renders 4k+1 frames at sides divisible by 16. Its I2V pipeline takes one image per call,
so it renders one row per call. Its V2V pipeline takes the frame count from the input video.
Unlike text-to-video, both clean prompts with ftfy unguarded: it must be installed.
"""

from __future__ import annotations

from typing import Mapping

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter
from rendering.pipelines.shapes import ShapeFacts, with_defaults


class _Wan(Adapter):
    family = "wan"
    # AutoencoderKLWan's and WanTransformer3DModel's defaults (Wan 2.1's).
    vae_defaults = {"scale_factor_temporal": 4, "scale_factor_spatial": 8,
                    "temperal_downsample": [False, True, True]}
    denoiser_defaults = {"patch_size": (1, 2, 2)}

    @classmethod
    def facts_from_configs(cls, configs: Mapping[str, Mapping]) -> ShapeFacts:
        # WanPipeline and WanImageToVideoPipeline take the VAE config's own factors.
        vae = with_defaults(configs["vae"], cls.vae_defaults)
        return cls.facts(vae["scale_factor_temporal"], vae["scale_factor_spatial"],
                         cls.denoiser(configs))


class WanTextToVideo(_Wan):
    pipeline = "WanPipeline"


class WanImageToVideo(_Wan):
    pipeline = "WanImageToVideoPipeline"
    requires = ("image",)
    max_batch = 1


class WanVideoToVideo(_Wan):
    pipeline = "WanVideoToVideoPipeline"
    requires = ("video",)
    takes_strength = True
    takes_num_frames = False

    @classmethod
    def facts_from_configs(cls, configs: Mapping[str, Mapping]) -> ShapeFacts:
        # WanVideoToVideoPipeline counts the VAE's downsampling blocks instead.
        downsample = with_defaults(configs["vae"], cls.vae_defaults)["temperal_downsample"]
        return cls.facts(2 ** sum(downsample), 2 ** len(downsample), cls.denoiser(configs))


ADAPTERS = (WanTextToVideo, WanImageToVideo, WanVideoToVideo)


# The tiny twins' VAE and transformer configs: the builders use them, and ``reelfarm plan``
# reads their shape facts from them without building anything.
_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True])
_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# Wan 2.1 I2V: the noise, a 4-channel first-frame mask and the image's 16 latent channels in;
# CLIP's image tokens through extra key/value projections (inner dim 2 heads x 12).
_I2V_TRANSFORMER = dict(_TRANSFORMER, in_channels=16 + 4 + 16, image_dim=32, added_kv_proj_dim=24)


def _transformer(config: dict):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**config)


def _components() -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKLWan(**_VAE)
    return dict(tokenizer=tiny_components.t5_tokenizer(),
                text_encoder=tiny_components.umt5_encoder(),
                vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _text_to_video():
    from diffusers import WanPipeline

    return WanPipeline(transformer=_transformer(_TRANSFORMER), **_components())


def _image_to_video():
    from diffusers import WanImageToVideoPipeline

    image_encoder, image_processor = tiny_components.clip_vision_encoder()
    transformer = _transformer(_I2V_TRANSFORMER)
    return WanImageToVideoPipeline(transformer=transformer, image_encoder=image_encoder,
                                   image_processor=image_processor, **_components())


def _video_to_video():
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline(transformer=_transformer(_TRANSFORMER), **_components())


TINY = {"wan": _text_to_video, "wan-i2v": _image_to_video, "wan-v2v": _video_to_video}
TINY_CONFIGS = {
    "wan": ("WanPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
    "wan-i2v": ("WanImageToVideoPipeline", {"vae": _VAE, "transformer": _I2V_TRANSFORMER}),
    "wan-v2v": ("WanVideoToVideoPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
}
