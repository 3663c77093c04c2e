"""Load a diffusers video pipeline once, and render batches of tasks with it.

Every family goes through the same steps; what differs (inputs, shape rules, batching, call
kwargs) is declared by its adapter. Weights load from safetensors only and remote code is
never run.
"""

from __future__ import annotations

import inspect
import logging
import tempfile

import numpy as np
import torch

from rendering import model_cache
from rendering.contract import ModelSpec, OptimizeSpec, Task
from rendering.pipelines import adapter_for, adapter_named, tiny
from rendering.pipelines.base import Adapter, denoiser_of
from rendering.pipelines.schedulers import apply_scheduler, check_scheduler
from rendering.pipelines.weights import from_pretrained, quiet_progress_bars

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
    silence its progress bars.

    ``spec.pipeline`` loads the weights as another class of the same family (LTX's text-to-video
    checkpoint as LTXImageToVideoPipeline, Wan's as WanVideoToVideoPipeline); only classes an
    adapter drives are accepted, so no arbitrary attribute of diffusers is ever called.
    """
    import diffusers

    dtype = DTYPES[spec.dtype]
    if spec.pipeline is not None:
        adapter_named(spec.pipeline)  # only a class an adapter drives is looked up in diffusers
    cls = getattr(diffusers, spec.pipeline) if spec.pipeline else diffusers.DiffusionPipeline
    if spec.scheduler:  # an unknown setting is refused before the weights load, not after
        check_scheduler(spec.scheduler, dict(spec.scheduler_config))
    if tiny.is_tiny(spec.path):
        pipe = _tiny_pipeline(tiny.tiny_kind(spec.path), cls, dtype)
    else:
        # A URL or hub id is fetched once per node into the node-local cache, then loaded.
        pipe = from_pretrained(cls, model_cache.resolve(spec), dtype, revision=spec.revision,
                               variant=spec.variant)
    adapter_for(pipe).prepare(pipe)  # refuse a pipeline no adapter drives, before anything else
    if spec.scheduler:
        apply_scheduler(pipe, spec.scheduler, dict(spec.scheduler_config))
    apply_optimizations(pipe, optimize, device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s as %s", spec.path, type(pipe).__name__, device, spec.dtype)
    return pipe


def _tiny_pipeline(kind: str, cls, dtype: torch.dtype):
    """A tiny pipeline as ``cls`` in ``dtype``.

    In float32 it is built in memory. In another dtype it goes through save_pretrained and
    from_pretrained, as a published model would (well under a second at this size): only that
    keeps the modules a model declares float32-only (``_keep_in_fp32_modules``, diffusers' and
    transformers' rules) in float32; ``pipe.to(dtype)`` casts them too, and diffusers warns.
    """
    import diffusers

    pipe = tiny.build_tiny_pipeline(kind)
    if dtype == torch.float32:
        if cls is diffusers.DiffusionPipeline or type(pipe) is cls:
            return pipe
        # As from_pretrained does: the components cls takes (WanPipeline's optional
        # transformer_2 is not one of WanVideoToVideoPipeline's).
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in pipe.components.items() if k in accepted})
    with tempfile.TemporaryDirectory(prefix="reelfarm-tiny-") as folder:
        with quiet_progress_bars():
            pipe.save_pretrained(folder, safe_serialization=True)
        return from_pretrained(cls, folder, dtype)


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


def _dispatches_attention(denoiser) -> bool:
    """Whether attention goes through diffusers' dispatcher, which ``set_attention_backend``
    steers; older processors (ModelScope's UNet3D) call torch SDPA and would ignore it."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend")
               for m in denoiser.modules())


def prompts_truncated(pipe, prompts: list[str]) -> list[bool]:
    """For each prompt, whether the text encoder will read only its first tokens."""
    found = prompt_tokenizer(pipe)
    if found is None:
        return [False] * len(prompts)
    tokenizer, limit = found
    ids = tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(i) > limit for i in ids]


def prompt_tokenizer(pipe) -> tuple[object, int] | None:
    """The tokenizer a pipeline reads its prompt with and how many of its tokens it keeps, or
    None for a pipeline that takes no prompt. ``pipe`` may be anything with the pipeline's
    ``__call__`` and tokenizers (a text stage reads the video model's limit without its weights).

    The pipeline cuts prompts to its ``max_sequence_length`` (Wan, CogVideoX) or else to its
    tokenizer's ``model_max_length`` (CLIP-based models); a longer prompt still renders.
    """
    param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    # Flux reads the prompt through CLIP (a pooled summary) and T5 (``tokenizer_2``, the
    # sequence the model attends to): the limit that matters is T5's.
    tokenizer = (param is not None and getattr(pipe, "tokenizer_2", None)) \
        or getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return None
    limit = param.default if param is not None and isinstance(param.default, int) \
        else tokenizer.model_max_length
    return tokenizer, int(limit)


def render_batch(pipe, adapter: type[Adapter], tasks: list[Task], media: list[dict]) -> np.ndarray:
    """The frames of ``render_flagged``, for callers that need no safety flags."""
    return render_flagged(pipe, adapter, tasks, media)[0]


def render_flagged(pipe, adapter: type[Adapter], tasks: list[Task],
                   media: list[dict]) -> tuple[np.ndarray, list[bool | None]]:
    """Render tasks that share a batch key in one call; returns float frames (B, F, H, W, 3),
    F = 1 for an image pipeline, and per row whether the pipeline's safety checker flagged its
    picture (and blacked it out), None where there is no checker.

    Each video gets its own CPU generator seeded from its row, so a row's video does not
    depend on which GPU, or which worker, rendered it. A pipeline that draws from the global
    RNG gets it seeded from the (single) row too.
    """
    params = tasks[0].params
    generators = [torch.Generator("cpu").manual_seed(t.seed) for t in tasks]
    kwargs = adapter.call_kwargs(tasks, media, generators)
    with torch.random.fork_rng(devices=[], enabled=adapter.global_rng):
        if adapter.global_rng:
            torch.manual_seed(tasks[0].seed)  # batch_limit keeps such batches to one row
        with torch.inference_mode():
            output = pipe(**kwargs)
    # An image pipeline's pictures are one-frame clips: (B, H, W, 3) -> (B, 1, H, W, 3).
    frames = output.frames if adapter.makes == "video" else output.images
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    frames = np.asarray(frames)
    if adapter.makes == "image":
        frames = frames[:, None]
    num_frames = params["num_frames"] if adapter.makes == "video" else 1
    expected = (len(tasks), num_frames, params["height"], params["width"], 3)
    if frames.shape != expected:
        raise ValueError(f"pipeline returned frames of shape {frames.shape}, expected {expected}")
    return frames, _safety_flags(output, adapter, len(tasks))


def _safety_flags(output, adapter: type[Adapter], rows: int) -> list[bool | None]:
    """The flag the adapter declares, per row; None for each where the pipeline has no checker
    (SD's output then carries None, as its checker is optional)."""
    flags = getattr(output, adapter.safety_flag, None) if adapter.safety_flag else None
    return [None] * rows if flags is None else [bool(f) for f in flags]

