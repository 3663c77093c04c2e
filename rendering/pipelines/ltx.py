"""LTX-Video (DiT, 32x spatial and 8x temporal VAE): text-to-video and image-to-video.

LTX renders 8k+1 frames (it silently rounds other counts down: 8 gives 1) at sides divisible by
32 (its own check, whatever the VAE), and names its factors ``vae_temporal_compression_ratio``
and ``vae_spatial_compression_ratio``.

How rows may batch depends on the checkpoint's VAE (its config says which; diffusers'
``scripts/convert_ltx_to_diffusers.py`` lists them by version):
- ``decoder_inject_noise`` (0.9.1): the decoder adds noise drawn from torch's global RNG, one
  draw shared by the whole batch, so every row renders alone with that RNG seeded from it.
- ``timestep_conditioning`` (0.9.1, 0.9.5, 0.9.7): the pipeline draws decode noise from the
  row's generator; the image-to-video pipeline draws it with ``torch.randn``, which crashes on a
  list of generators, so it gets the row's generator alone (one row per call).
- neither (0.9.0): nothing is drawn at decode, so both pipelines batch.
Text-to-video thus batches with every VAE but 0.9.1's.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Mapping

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter
from rendering.pipelines.shapes import ShapeFacts, with_defaults


class _LTX(Adapter):
    family = "ltx"
    global_rng = True  # until its VAE says otherwise (for_vae)
    # Whether it draws a timestep-conditioned VAE's decode noise from one generator per video
    # (LTXPipeline's randn_tensor) or from a single one (LTXImageToVideoPipeline's torch.randn).
    decode_noise_per_video: ClassVar[bool] = True
    # AutoencoderKLLTXVideo's and LTXVideoTransformer3DModel's defaults.
    vae_defaults = {"patch_size": 4, "patch_size_t": 1,
                    "spatio_temporal_scaling": (True, True, True, False),
                    "spatial_compression_ratio": None, "temporal_compression_ratio": None,
                    "decoder_inject_noise": (False, False, False, False, False),
                    "timestep_conditioning": False}
    denoiser_defaults = {"patch_size": 1}

    @classmethod
    def for_pipe(cls, pipe) -> type[Adapter]:
        return cls.for_vae(pipe.vae.config)

    @classmethod
    def for_vae(cls, vae: Mapping) -> type[Adapter]:
        """The adapter that batches as a model with this VAE config (loaded, or its
        config.json) may: see the module docstring."""
        vae = with_defaults(vae, cls.vae_defaults)
        return _variant(cls, global_rng=any(vae["decoder_inject_noise"]),
                        generator_list=cls.decode_noise_per_video
                        or not vae["timestep_conditioning"])

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
    decode_noise_per_video = False
    generator_list = False  # until its VAE says otherwise (for_vae)


ADAPTERS = (LTXTextToVideo, LTXImageToVideo)


@functools.cache
def _variant(adapter: type[_LTX], global_rng: bool, generator_list: bool) -> type[Adapter]:
    """``adapter`` with these two declarations (itself when they are its own)."""
    if (adapter.global_rng, adapter.generator_list) == (global_rng, generator_list):
        return adapter
    return type(adapter.__name__, (adapter,),
                {"global_rng": global_rng, "generator_list": generator_list})


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
# The 0.9.0 layout, same compression: a plain decoder that adds no noise, so rows batch.
_VAE_090 = dict(
    latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
    decoder_spatio_temporal_scaling=(True, True, True, False),
    decoder_inject_noise=(False, False, False, False, False),
    upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
    timestep_conditioning=False)


def _components(vae_config: dict) -> dict:
    import torch
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler,
                           LTXVideoTransformer3DModel)

    transformer = LTXVideoTransformer3DModel(**_TRANSFORMER)
    vae = AutoencoderKLLTXVideo(**vae_config)
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


def _text_to_video(vae_config: dict = _VAE):
    from diffusers import LTXPipeline

    return LTXPipeline(**_components(vae_config))


def _image_to_video():
    from diffusers import LTXImageToVideoPipeline

    return LTXImageToVideoPipeline(**_components(_VAE))


TINY = {"ltx": _text_to_video, "ltx-i2v": _image_to_video,
        "ltx-0.9.0": functools.partial(_text_to_video, _VAE_090)}
TINY_CONFIGS = {"ltx": ("LTXPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
                "ltx-i2v": ("LTXImageToVideoPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
                "ltx-0.9.0": ("LTXPipeline", {"vae": _VAE_090, "transformer": _TRANSFORMER})}
