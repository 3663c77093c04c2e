"""The full-size models the GPU benchmark measures, built with random weights and no network.

The published architectures (ModelScope text-to-video 1.7B, Wan 2.1 T2V 1.3B) are written out
here as diffusers configs, with the render settings each is measured at; ``ensure_model``
builds one with random weights and saves it once under bench/out/gpu/, so every contender loads
the same weights with from_pretrained. ``bench.gpu`` and ``bench.options`` both use them, and
neither needs the other for it.
"""

from __future__ import annotations

import gc
import os
import shutil
import time

from bench.common import OUT

# Published architectures (diffusers configs of ali-vilab/text-to-video-ms-1.7b and
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers), written out so that no hub access is needed.
MODELSCOPE = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=64, norm_num_groups=32),
    "text": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                 num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
                 hidden_act="gelu", max_position_embeddings=77),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), sample_size=256,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    "render": dict(num_frames=16, height=256, width=256, num_inference_steps=25, guidance_scale=9.0),
}
WAN_1_3B = {
    "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                        ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "text": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                 num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                 pad_token_id=0, eos_token_id=1),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True]),
    "render": dict(num_frames=33, height=480, width=832, num_inference_steps=30, guidance_scale=5.0),
}
SPECS = {"modelscope": MODELSCOPE, "wan": WAN_1_3B}


def ensure_model(kind: str, quick: bool = False) -> str:
    """The model's diffusers folder under bench/out/gpu/, built and saved on first use: the
    full-size random-weight model, or with ``quick`` the tiny one. A folder is renamed into
    place once complete, so a run killed while saving leaves nothing that looks usable."""
    import torch

    from rendering.pipelines.tiny import save_tiny_pipeline

    path = os.path.join(OUT, "gpu", f"{kind}-{'tiny' if quick else 'random'}")
    if os.path.exists(os.path.join(path, "model_index.json")):
        return path
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    if quick:
        save_tiny_pipeline(kind, partial)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = build_pipeline(kind, device, torch.float16)
        pipe.save_pretrained(partial, safe_serialization=True)
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)
    os.rename(partial, path)
    print(f"{kind}: model saved in {time.monotonic() - started:.0f} s: {path}", flush=True)
    return path


def build_pipeline(kind: str, device: str, dtype):
    """A pipeline of the published size with random weights, made on ``device`` directly, to
    be saved. Non-persistent buffers (CLIP's position ids, Wan's RoPE tables) are left
    uninitialised: they are not saved, and from_pretrained computes them again."""
    import torch

    from rendering.pipelines import tiny, tiny_components

    with torch.device("meta"):
        parts = modules(kind)
    for name, module in parts.items():
        module = module.to(dtype=dtype).to_empty(device=device)
        if hasattr(module, "tie_weights"):  # to_empty unties UMT5's shared embedding (1B params)
            module.tie_weights()
        _randomize(module)
        parts[name] = module.eval()
    if kind == "modelscope":
        from diffusers import DDIMScheduler, TextToVideoSDPipeline

        return TextToVideoSDPipeline(
            vae=parts["vae"], text_encoder=parts["text"], unet=parts["unet"],
            tokenizer=tiny_components.clip_tokenizer(),  # a small vocabulary; ids are all the model sees
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False))
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=tiny.build_tiny_pipeline("wan").tokenizer,  # as above
                       text_encoder=parts["text"], vae=parts["vae"],
                       transformer=parts["transformer"],
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def modules(kind: str) -> dict:
    spec = SPECS[kind]
    if kind == "modelscope":
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        return {"unet": UNet3DConditionModel(**spec["unet"]),
                "text": CLIPTextModel(CLIPTextConfig(**spec["text"])),
                "vae": AutoencoderKL(**spec["vae"])}
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return {"transformer": WanTransformer3DModel(**spec["transformer"]),
            "text": UMT5EncoderModel(UMT5Config(**spec["text"])),
            "vae": AutoencoderKLWan(**spec["vae"])}


def _randomize(module) -> None:
    """Small random weights (unit norms, zero biases): finite activations through every layer,
    in fp16 too (the plain loop checks its frames are finite)."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1 or name.endswith("gamma"):  # norm scales (Wan's VAE: gamma, 4-D)
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(0.0, 0.02)

