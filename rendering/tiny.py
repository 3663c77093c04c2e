"""Tiny random-weight text-to-video pipelines, built offline in code.

They exercise the same diffusers code paths as the published models (ModelScope's UNet3D and
Wan 2.1's DiT) at a size that renders in well under a second on a CPU, so the demo and the
tests need no network and no downloaded weights. Weights are seeded: the same kind always
gives the same pipeline, so videos rendered with it are reproducible.
"""

from __future__ import annotations

import string

TINY_KINDS = ("modelscope", "wan")
TINY_PREFIX = "tiny:"
_WEIGHT_SEED = 0


def is_tiny(model_path: str) -> bool:
    return model_path.startswith(TINY_PREFIX)


def tiny_kind(model_path: str) -> str:
    kind = model_path[len(TINY_PREFIX):]
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model {model_path!r}: choose one of "
                         + ", ".join(TINY_PREFIX + k for k in TINY_KINDS))
    return kind


def build_tiny_pipeline(kind: str):
    """Return a freshly built random-weight pipeline of ``kind`` ('modelscope' or 'wan')."""
    import torch

    builder = {"modelscope": _modelscope, "wan": _wan}[tiny_kind(TINY_PREFIX + kind)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        pipe = builder()
    # Modules are built in training mode; from_pretrained gives eval mode, and so must this,
    # or UMT5's dropout makes every Wan video differ from call to call.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def save_tiny_pipeline(kind: str, directory: str) -> None:
    """Write a tiny pipeline as a diffusers folder (safetensors), loadable by from_pretrained."""
    build_tiny_pipeline(kind).save_pretrained(directory, safe_serialization=True)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=77)


def _modelscope():
    from diffusers import (AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline,
                           UNet3DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32))
    unet = UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=2)
    # Four VAE blocks give the real model's 8x spatial downsampling, which keeps latents small.
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, sample_size=64, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=False)
    return TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=unet, scheduler=scheduler)


def _wan():
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in string.ascii_lowercase]
    pieces += [(ch, -2.0) for ch in string.ascii_lowercase + string.digits]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=64)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
