"""Load a diffusers text-to-video pipeline once, and render batches of rows with it.

Any pipeline whose output ``.frames`` is a video batch works through the same code: ModelScope's
UNet3D, Wan's DiT, CogVideoX, and kin. Weights load from safetensors only and remote code is
never run.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch

from rendering import model_cache, tiny
from rendering.specs import ModelSpec, OptimizeSpec, RenderTask

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device() -> str:
    """``cuda`` when Ray (or the user) has made a GPU visible, else ``cpu``.

    Inside a Ray actor CUDA_VISIBLE_DEVICES already names the one pinned GPU, so it is always
    ``cuda`` (index 0 of what is visible), never a remembered physical index.
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(spec: ModelSpec, device: str, optimize: OptimizeSpec = OptimizeSpec()):
    """Build or load the pipeline, place it on ``device`` with its speed and memory options, and
    silence its progress bars."""
    from diffusers import DiffusionPipeline

    dtype = DTYPES[spec.dtype]
    if tiny.is_tiny(spec.path):
        pipe = tiny.build_tiny_pipeline(tiny.tiny_kind(spec.path))
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        # A URL or hub id is fetched once per node into the node-local cache, then loaded.
        pipe = DiffusionPipeline.from_pretrained(
            model_cache.resolve(spec), revision=spec.revision, variant=spec.variant,
            torch_dtype=dtype, use_safetensors=True, trust_remote_code=False)
    _check_text_to_video(pipe)
    apply_optimizations(pipe, optimize, device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s as %s", spec.path, type(pipe).__name__, device, spec.dtype)
    return pipe


def apply_optimizations(pipe, opt: OptimizeSpec, device: str) -> None:
    """Apply ``opt`` in the order diffusers expects: attention and caches on the denoiser, VAE
    memory savers, then placement (offload replaces ``.to(device)``), then compilation."""
    denoiser = denoiser_of(pipe)
    name = type(denoiser).__name__
    if opt.attention_backend:
        if not _dispatches_attention(denoiser):
            raise ValueError(f"optimize.attention_backend: {name} calls torch SDPA itself, not "
                             "diffusers' attention dispatcher (DiTs such as Wan's use it)")
        denoiser.set_attention_backend(opt.attention_backend)
    if opt.first_block_cache_threshold is not None:
        if not hasattr(denoiser, "enable_cache"):
            raise ValueError(f"optimize.first_block_cache_threshold: {name} has no cache hooks "
                             "(they exist for DiT transformers such as Wan's)")
        from diffusers import FirstBlockCacheConfig

        denoiser.enable_cache(FirstBlockCacheConfig(threshold=opt.first_block_cache_threshold))
    if opt.vae_slicing:
        pipe.vae.enable_slicing()
    if opt.vae_tiling:
        pipe.vae.enable_tiling()
    if opt.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif opt.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if opt.compile == "repeated_blocks":
        if not getattr(denoiser, "_repeated_blocks", None):
            raise ValueError(f"optimize.compile: {name} declares no repeated blocks; use 'full'")
        denoiser.compile_repeated_blocks(fullgraph=True)
    elif opt.compile == "full":
        denoiser.compile()


def denoiser_of(pipe):
    """The model the sampler calls every step: a DiT's transformer or a UNet."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def _dispatches_attention(denoiser) -> bool:
    """Whether attention goes through diffusers' dispatcher, which ``set_attention_backend``
    steers; older processors (ModelScope's UNet3D) call torch SDPA and would ignore it."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend")
               for m in denoiser.modules())


def _check_text_to_video(pipe) -> None:
    params = inspect.signature(pipe.__call__).parameters
    missing = [p for p in ("prompt", "num_frames", "height", "width", "generator") if p not in params]
    if missing:
        raise TypeError(f"{type(pipe).__name__} is not a text-to-video pipeline: its __call__ "
                        f"takes no {', '.join(missing)}")


def shape_problem(pipe, num_frames: int, height: int, width: int) -> str | None:
    """Why ``pipe`` cannot render exactly this video shape, or None when it can.

    Checked before rendering, because some pipelines do not refuse a shape they cannot make:
    Wan rounds the frame count down to the nearest 4k+1 and renders a video the frame check
    then rejects, after the GPU time is spent.
    """
    name = type(pipe).__name__
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or 1
    if temporal > 1 and (num_frames - 1) % temporal:
        below = (num_frames - 1) // temporal * temporal + 1
        return (f"{name} renders {temporal}k+1 frames; num_frames={num_frames} is not one "
                f"({below} or {below + temporal} is)")
    multiple = _spatial_multiple(pipe)
    if height % multiple or width % multiple:
        return (f"{name} needs height and width divisible by {multiple}; "
                f"{height}x{width} is not")
    return None


def _spatial_multiple(pipe) -> int:
    """Pixels per latent cell (the VAE's downscale) times the denoiser's patch size."""
    vae_factor = (getattr(pipe, "vae_scale_factor_spatial", None)
                  or getattr(pipe, "vae_scale_factor", None) or 1)
    patch = getattr(getattr(denoiser_of(pipe), "config", None), "patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return int(vae_factor) * int(patch)


def prompts_truncated(pipe, prompts: list[str]) -> list[bool]:
    """For each prompt, whether the text encoder will read only its first tokens.

    The pipeline cuts prompts to its ``max_sequence_length`` (Wan, CogVideoX) or else to its
    tokenizer's ``model_max_length`` (CLIP-based models); a longer prompt still renders.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return [False] * len(prompts)
    param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    limit = param.default if param is not None and isinstance(param.default, int) \
        else tokenizer.model_max_length
    ids = tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(i) > limit for i in ids]


def render_batch(pipe, tasks: list[RenderTask]) -> np.ndarray:
    """Render rows that share a batch key in one call; returns float frames (B, F, H, W, 3).

    Each video gets its own CPU generator seeded from its row, so a row's video does not
    depend on which GPU, or which worker, rendered it.
    """
    first = tasks[0]
    generators = [torch.Generator("cpu").manual_seed(t.seed) for t in tasks]
    kwargs = dict(
        prompt=[t.prompt for t in tasks],
        num_frames=first.num_frames, height=first.height, width=first.width,
        num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
        generator=generators, output_type="np")
    if first.negative_prompt is not None:
        kwargs["negative_prompt"] = [t.negative_prompt for t in tasks]
    with torch.inference_mode():
        frames = pipe(**kwargs).frames
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    frames = np.asarray(frames)
    expected = (len(tasks), first.num_frames, first.height, first.width, 3)
    if frames.shape != expected:
        raise ValueError(f"pipeline returned frames of shape {frames.shape}, expected {expected}")
    return frames
