"""LTX-Video (DiT, 32x spatial and 8x temporal VAE): text-to-video and image-to-video.

LTX renders 8k+1 frames (it silently rounds other counts down: 8 gives 1) at sides divisible by
32 (its own check, whatever the VAE), and names its factors ``vae_temporal_compression_ratio``
and ``vae_spatial_compression_ratio``. The 0.9.1 VAE injects noise while decoding, drawn from
torch's global RNG rather than the row's generator, so every row renders alone with that RNG
seeded from it. The image-to-video pipeline draws that VAE's decode noise with ``torch.randn``,
which crashes on a list of generators, so it gets the row's generator alone.
"""

from __future__ import annotations

from typing import Mapping

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter
from rendering.pipelines.shapes import ShapeFacts, with_defaults

class _LTX(Adapter):
    family = "ltx"
    global_rng = True
    # AutoencoderKLLTXVideo's and LTXVideoTransformer3DModel's defaults.
    vae_defaults = {"patch_size": 4, "patch_size_t": 1,
                    "spatio_temporal_scaling": (True, True, True, False),
                    "spatial_compression_ratio": None, "temporal_compression_ratio": None}
    denoiser_defaults = {"patch_size": 1}

    @classmethod
    def facts_from_pipe(cls, pipe) -> ShapeFacts:
        return cls.facts(pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio,
                         {"patch_size": pipe.transformer_spatial_patch_size})

    @classmethod
    def facts_from_configs(cls, configs: Mapping[str, Mapping]) -> ShapeFacts:
        # As AutoencoderKLLTXVideo computes its ratios: patch size times 2 per scaling block,
        # unless the config sets the ratio itself.
        vae = with_defaults(configs["vae"], cls.vae_defaults)
        scaling = 2 ** sum(vae["spatio_temporal_scaling"])
        spatial = vae["spatial_compression_ratio"] or vae["patch_size"] * scaling
        temporal = vae["temporal_compression_ratio"] or vae["patch_size_t"] * scaling
        return cls.facts(temporal, spatial, cls.denoiser(configs))

    checked_side_multiple = 32  # LTX's check_inputs refuses sides not divisible by 32


class LTXTextToVideo(_LTX):
    pipeline = "LTXPipeline"


class LTXImageToVideo(_LTX):
    pipeline = "LTXImageToVideoPipeline"
    requires = ("image",)
    generator_list = False


ADAPTERS = (LTXTextToVideo, LTXImageToVideo)


# The tiny twins' VAE and transformer configs: the builders use them, and ``reelfarm plan``
# reads their shape facts from them without building anything.
_TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                    cross_attention_dim=32, num_layers=1, caption_channels=32)
# The 0.9.1 VAE layout at 8 channels: patch 4 and three scaling blocks keep the real 32x/8x
# compression; its decoder is timestep-conditioned and injects noise.
_VAE = dict(
    latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(True, True, True, False), upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2), timestep_conditioning=True)


def _components() -> dict:
    import torch
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler,
                           LTXVideoTransformer3DModel)

    transformer = LTXVideoTransformer3DModel(**_TRANSFORMER)
    vae = AutoencoderKLLTXVideo(**_VAE)
    # Trained weights scale the injected noise; their zero init would hide it.
    for name, param in vae.named_parameters():
        if "per_channel_scale" in name:
            torch.nn.init.normal_(param, std=0.1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1)
    return dict(scheduler=scheduler, vae=vae, text_encoder=tiny_components.t5_encoder(),
                tokenizer=tiny_components.t5_tokenizer(model_max_length=128),
                transformer=transformer)


def _text_to_video():
    from diffusers import LTXPipeline

    return LTXPipeline(**_components())


def _image_to_video():
    from diffusers import LTXImageToVideoPipeline

    return LTXImageToVideoPipeline(**_components())


TINY = {"ltx": _text_to_video, "ltx-i2v": _image_to_video}
_TINY_CONFIGS = {"vae": _VAE, "transformer": _TRANSFORMER}
TINY_CONFIGS = {"ltx": ("LTXPipeline", _TINY_CONFIGS),
                "ltx-i2v": ("LTXImageToVideoPipeline", _TINY_CONFIGS)}
