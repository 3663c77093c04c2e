"""CogVideoX (DiT, causal 3D VAE): text-to-video, image-to-video and video-to-video.

Its VAE decodes latent frames in pairs, so a video has exactly the frames asked for only when
their count is 0 or 1 modulo twice the VAE's temporal factor (8k or 8k+1 for the published
models); other counts are silently rounded (13 gives 16). Sides must divide by the VAE's 8x times
the patch size 2: the pipeline checks 8 only, then crashes. A transformer with learned positional
embeddings (CogVideoX-5b-I2V) renders only the size it was trained at, and CogVideoX 1.5
(``patch_size_t``) no more than its sample size.
"""

from __future__ import annotations

from itertools import count

from rendering.pipelines import tiny_parts
from rendering.pipelines.base import Adapter, nearest


class _CogVideoX(Adapter):
    family = "cogvideox"

    @classmethod
    def frame_residues(cls, pipe) -> tuple[int, ...]:
        """Frame counts, modulo twice the temporal factor, that decode to exactly that count."""
        return (0, 1)

    @classmethod
    def shape_problem(cls, pipe, num_frames: int, height: int, width: int) -> str | None:
        period = 2 * cls.temporal_factor(pipe)
        residues = cls.frame_residues(pipe)

        def exact(n: int) -> bool:
            return n >= 1 and n % period in residues

        if not exact(num_frames):
            below = next((n for n in range(num_frames - 1, 0, -1) if exact(n)), None)
            above = next(n for n in count(num_frames + 1) if exact(n))
            rule = " or ".join(f"{period}k+{r}" if r else f"{period}k" for r in residues)
            return (f"{cls.pipeline} renders {rule} frames; num_frames={num_frames} is not one "
                    f"({nearest(below or above, above)})")
        problem = cls.side_problem(cls.spatial_multiple(pipe), height, width)
        if problem:
            return problem
        config = pipe.transformer.config
        size_h = config.sample_height * pipe.vae_scale_factor_spatial
        size_w = config.sample_width * pipe.vae_scale_factor_spatial
        if config.use_learned_positional_embeddings and (height, width) != (size_h, size_w):
            return (f"{cls.pipeline} renders only {size_h}x{size_w} (its transformer learned "
                    f"positional embeddings for that size); {height}x{width} is not it")
        if config.patch_size_t and (height > size_h or width > size_w):
            return (f"{cls.pipeline} renders at most {size_h}x{size_w} (its rotary embeddings "
                    f"span that size); {height}x{width} is larger")
        return None


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

    @classmethod
    def frame_residues(cls, pipe) -> tuple[int, ...]:
        # CogVideoX 1.5 patches latent frames in pairs; its video-to-video refuses an odd count.
        return (0,) if pipe.transformer.config.patch_size_t else (0, 1)


ADAPTERS = (CogVideoXTextToVideo, CogVideoXImageToVideo, CogVideoXVideoToVideo)


def _components(in_channels: int = 4, **transformer_extra) -> dict:
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                           CogVideoXTransformer3DModel)

    # Rotary embeddings as in CogVideoX-5b (they need heads of 16); the real models' 226 text
    # tokens, 4x temporal and 8x spatial VAE compression and patch size 2.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4,
        time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_height=4, sample_width=4,
        sample_frames=9, use_rotary_positional_embeddings=True, **transformer_extra)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                 layers_per_block=1, norm_num_groups=2)
    scheduler = CogVideoXDDIMScheduler(clip_sample=False, prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                       timestep_spacing="trailing")
    return dict(tokenizer=tiny_parts.t5_tokenizer(model_max_length=226),
                text_encoder=tiny_parts.t5_encoder(), vae=vae, transformer=transformer,
                scheduler=scheduler)


def _text_to_video():
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline(**_components())


def _image_to_video():
    from diffusers import CogVideoXImageToVideoPipeline

    # The image latents join the noise channel-wise; learned positional embeddings as in
    # CogVideoX-5b-I2V, so this twin renders 32x32 only.
    return CogVideoXImageToVideoPipeline(
        **_components(in_channels=8, use_learned_positional_embeddings=True))


def _video_to_video():
    from diffusers import CogVideoXVideoToVideoPipeline

    return CogVideoXVideoToVideoPipeline(**_components())


TINY = {"cogvideox": _text_to_video, "cogvideox-i2v": _image_to_video,
        "cogvideox-v2v": _video_to_video}
