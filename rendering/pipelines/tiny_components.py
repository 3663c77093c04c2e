"""The random-weight components the families' tiny twins share: text encoders, tokenizers, a VAE.

Tokenizers are made from an in-code vocabulary (no hub download); encoders are random-weight
and tiny. The family modules assemble them with their own denoisers and VAEs; ``tiny`` builds
the pipelines.
"""

from __future__ import annotations

import string


def clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), projection_dim=projection_dim))


def t5_pieces() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in string.ascii_lowercase]
    pieces += [(ch, -2.0) for ch in string.ascii_lowercase + string.digits]
    return pieces


def t5_tokenizer(model_max_length: int = 64):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_pieces(), extra_ids=0, model_max_length=model_max_length)


def umt5_encoder(d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(t5_pieces()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(t5_pieces()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def clip_vision_encoder(image_size: int = 32, hidden_size: int = 32, projection_dim: int = 32):
    """A tiny CLIP image encoder and its processor (image-conditioned pipelines use both)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=hidden_size, projection_dim=projection_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=image_size, intermediate_size=37, patch_size=4))
    processor = CLIPImageProcessor(crop_size=image_size, size={"shortest_edge": image_size})
    return encoder, processor


def sd_vae(sample_size: int):
    """A Stable-Diffusion-style image VAE. Four blocks give the real models' 8x spatial
    downsampling, which keeps latents small."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, sample_size=sample_size, norm_num_groups=2)


def sd_safety_checker(concept_threshold: float, image_size: int = 32):
    """A tiny StableDiffusionSafetyChecker and its feature extractor. It flags a picture (and SD
    blacks it out) when the cosine of the picture's embedding with one of its concepts, rounded
    to 3 places, is above that concept's threshold. Here every concept is one random direction
    with one threshold, so ``concept_threshold`` decides how many pictures it flags."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    checker = StableDiffusionSafetyChecker(CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, intermediate_size=37, patch_size=4),
        projection_dim=32))
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(32).expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(concept_threshold)
    processor = CLIPImageProcessor(crop_size=image_size, size={"shortest_edge": image_size})
    return checker, processor
