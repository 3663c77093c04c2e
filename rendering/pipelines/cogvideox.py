"""CogVideoX (DiT, causal 3D VAE): text-to-video, image-to-video and video-to-video.

Its VAE decodes latent frames in pairs, so a video has exactly the frames asked for only when
their count is 0 or 1 modulo twice the VAE's temporal factor (8k or 8k+1 for the published
models); other counts are silently rounded (13 gives 16). Sides must divide by the VAE's 8x times
the patch size 2: the pipeline checks 8 only, then crashes. A transformer with learned positional
embeddings (CogVideoX-5b-I2V) renders only the size it was trained at, and CogVideoX 1.5
(``patch_size_t``) no more than its sample size.
"""

from __future__ import annotations

from typing import Mapping

from rendering.pipelines import tiny_components
from rendering.pipelines.base import Adapter
from rendering.pipelines.shapes import ShapeFacts, with_defaults


class _CogVideoX(Adapter):
    family = "cogvideox"
    # AutoencoderKLCogVideoX's and CogVideoXTransformer3DModel's defaults.
    vae_defaults = {"block_out_channels": (128, 256, 256, 512), "temporal_compression_ratio": 4}
    denoiser_defaults = {"patch_size": 2, "patch_size_t": None, "sample_height": 60,
                         "sample_width": 90, "use_learned_positional_embeddings": False}
    # CogVideoX 1.5 (patch_size_t) patches latent frames in pairs: its video-to-video pipeline
    # refuses an odd count of them.
    refuses_odd_latents_with_patch_t = False

    @classmethod
    def facts_from_pipe(cls, pipe) -> ShapeFacts:
        return cls.facts(pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial,
                         dict(pipe.transformer.config))

    @classmethod
    def facts_from_configs(cls, configs: Mapping[str, Mapping]) -> ShapeFacts:
        # As CogVideoX's pipelines compute them: 2 ** (len(vae.block_out_channels) - 1)
        # spatial, vae.temporal_compression_ratio temporal.
        vae = with_defaults(configs["vae"], cls.vae_defaults)
        return cls.facts(vae["temporal_compression_ratio"],
                         2 ** (len(vae["block_out_channels"]) - 1), cls.denoiser(configs))

    @classmethod
    def facts(cls, temporal: int | None, vae_spatial: int | None,
              denoiser: Mapping) -> ShapeFacts:
        """Frames: 0 or 1 modulo twice the temporal factor (the VAE decodes latent frames in
        pairs); sides: the VAE's factor times the patch size; learned positional embeddings
        fix the size, CogVideoX 1.5's rotary ones bound it."""
        config = with_defaults(denoiser, cls.denoiser_defaults)
        base = super().facts(temporal, vae_spatial, config)
        vae_spatial = int(vae_spatial or 1)
        size = (config["sample_height"] * vae_spatial, config["sample_width"] * vae_spatial)
        patch_t = config["patch_size_t"]
        return ShapeFacts(
            cls.pipeline, frame_period=2 * base.frame_period,
            frame_residues=(0,) if cls.refuses_odd_latents_with_patch_t and patch_t else (0, 1),
            side_multiple=base.side_multiple,
            only_size=size if config["use_learned_positional_embeddings"] else None,
            max_size=size if patch_t else None)


class CogVideoXTextToVideo(_CogVideoX):
    pipeline = "CogVideoXPipeline"


class CogVideoXImageToVideo(_CogVideoX):
    pipeline = "CogVideoXImageToVideoPipeline"
    requires = ("image",)


class CogVideoXVideoToVideo(_CogVideoX):
    pipeline = "CogVideoXVideoToVideoPipeline"
    requires = ("video",)
    takes_strength = True
    takes_num_frames = False
    refuses_odd_latents_with_patch_t = True


ADAPTERS = (CogVideoXTextToVideo, CogVideoXImageToVideo, CogVideoXVideoToVideo)


# The tiny twins' VAE and transformer configs: the builders use them, and ``reelfarm plan``
# reads their shape facts from them without building anything. Rotary embeddings as in
# CogVideoX-5b (they need heads of 16); the real models' 226 text tokens, 4x temporal and 8x
# spatial VAE compression and patch size 2.
_TRANSFORMER = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_height=4, sample_width=4,
    sample_frames=9, use_rotary_positional_embeddings=True)
# Image-to-video: the image latents join the noise channel-wise; learned positional embeddings
# as in CogVideoX-5b-I2V, so this twin renders 32x32 only.
_I2V_TRANSFORMER = dict(_TRANSFORMER, in_channels=8, use_learned_positional_embeddings=True)
_VAE = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
            norm_num_groups=2)


def _components(transformer: dict) -> dict:
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                           CogVideoXTransformer3DModel)

    transformer = CogVideoXTransformer3DModel(**transformer)
    vae = AutoencoderKLCogVideoX(**_VAE)
    # As the published scheduler_config.json sets them: every key explicit (a swap keeps them).
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, num_train_timesteps=1000,
                                       set_alpha_to_one=True, steps_offset=0,
                                       clip_sample=False, prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                       timestep_spacing="trailing")
    return dict(tokenizer=tiny_components.t5_tokenizer(model_max_length=226),
                text_encoder=tiny_components.t5_encoder(), vae=vae, transformer=transformer,
                scheduler=scheduler)


def _text_to_video():
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline(**_components(_TRANSFORMER))


def _image_to_video():
    from diffusers import CogVideoXImageToVideoPipeline

    return CogVideoXImageToVideoPipeline(**_components(_I2V_TRANSFORMER))


def _video_to_video():
    from diffusers import CogVideoXVideoToVideoPipeline

    return CogVideoXVideoToVideoPipeline(**_components(_TRANSFORMER))


TINY = {"cogvideox": _text_to_video, "cogvideox-i2v": _image_to_video,
        "cogvideox-v2v": _video_to_video}
TINY_CONFIGS = {
    "cogvideox": ("CogVideoXPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
    "cogvideox-i2v": ("CogVideoXImageToVideoPipeline",
                      {"vae": _VAE, "transformer": _I2V_TRANSFORMER}),
    "cogvideox-v2v": ("CogVideoXVideoToVideoPipeline", {"vae": _VAE, "transformer": _TRANSFORMER}),
}
