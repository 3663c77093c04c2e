"""CLIP scores of rendered videos: how well each frame matches its prompt, and how steady it is.

A worker loads one CLIP model next to its pipeline and scores the frames it actually rendered,
the uint8 pixels handed to the encoder (``encode.to_uint8(frames)``), batched across every frame
of every video in a call. For a video of frames ``x_0 .. x_{F-1}`` and prompt ``p``, with
``I(x)`` CLIP's projected image embedding, ``T(p)`` its projected text embedding and
``cos(a, b) = a·b / (|a| |b|)``:

- ``clip_scores``: per frame, ``s_i = max(100 * cos(I(x_i), T(p)), 0)``, torchmetrics'
  ``CLIPScore`` convention (0 to 100);
- ``clip_score``: ``mean_i s_i``, what torchmetrics' ``CLIPScore`` gives for the F frames, each
  paired with the prompt;
- ``clip_score_min``: ``min_i s_i``; ``clip_worst_frame``: the first ``i`` where it is reached;
- ``clip_temporal_consistency``: ``mean_{i=1..F-1} cos(I(x_{i-1}), I(x_i))``, raw cosines
  (-1 to 1, neither scaled nor clamped, as EvalCrafter averages them); None for a single frame;
- ``clip_drift_frames``: the number of frames with ``s_i < drift_threshold`` (on the same 0 to
  100 scale as ``s_i``);
- ``clip_embedding``: the video's embedding, ``m / |m|`` with ``m = mean_i I(x_i) / |I(x_i)|``
  (the normalized mean of the frames' unit image embeddings), float16, of the CLIP model's
  projection size (768 for ViT-L/14, 32 for ``tiny:clip``): what near-duplicates are found by;
- ``aesthetic_score``: the aesthetic head's mean over the first, middle and last frames' unit
  embeddings (see rendering.aesthetic); None without ``aesthetic_model``.

A row with no prompt (``None``) gets only the ``IMAGE_COLUMNS``; its prompt columns are None. Text longer than CLIP's context (77 tokens) is cut to it, as CLIP-conditioned pipelines do.

Frames are resized, center-cropped and normalised by the model's own image processor, always its
PIL backend (torchvision's resize differs slightly, and a node with torchvision installed must
not score the same video differently). ``tiny:clip`` is a random-weight CLIP built in code for
tests and the demo: its scores are well-formed numbers that mean nothing.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from rendering import model_cache
from rendering.contract import ScoringSpec

logger = logging.getLogger(__name__)

TINY_CLIP = "tiny:clip"
COLUMNS = ("clip_scores", "clip_score", "clip_score_min", "clip_worst_frame",
           "clip_temporal_consistency", "clip_drift_frames", "clip_embedding", "aesthetic_score")
IMAGE_COLUMNS = ("clip_temporal_consistency", "clip_embedding", "aesthetic_score")  # no prompt needed
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_IMAGE_SIZE = 32
_WEIGHT_SEED = 0
_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]  # config, processor, tokenizer, weights


class ClipScorer:
    """One CLIP model and its processors, loaded once per worker, scoring batches of videos."""

    def __init__(self, spec: ScoringSpec, device: str):
        """Load the model once, in eval mode on ``device``, so each video costs only its frames."""
        if spec.dtype not in DTYPES:
            raise ValueError(f"scoring dtype {spec.dtype!r}: choose one of {', '.join(DTYPES)}")
        if spec.batch_frames < 1:
            raise ValueError(f"scoring batch_frames must be at least 1, got {spec.batch_frames}")
        self.spec = spec
        self.device = torch.device(device)
        dtype = DTYPES[spec.dtype]
        if spec.model == TINY_CLIP:
            model, self.image_processor, self.tokenizer = build_tiny_clip()
            model = model.to(dtype)
        elif spec.model.startswith("tiny:"):
            raise ValueError(f"unknown tiny scoring model {spec.model!r}: the only one is "
                             f"{TINY_CLIP}")
        else:
            folder = model_cache.resolve_folder(spec.model, spec.revision,
                                                functools.partial(_download_clip, spec),
                                                marker="config.json", key="quality.clip_model")
            model, self.image_processor, self.tokenizer = load_clip(folder, dtype)
        self.model = model.to(self.device).eval()
        context = self.model.config.text_config.max_position_embeddings  # 77 for CLIP
        self.max_tokens = min(int(self.tokenizer.model_max_length), int(context))
        self.aesthetic = None
        if spec.aesthetic_model is not None:
            from rendering.aesthetic import load_head

            self.aesthetic = load_head(spec.aesthetic_model, spec.aesthetic_revision,
                                       int(self.model.config.projection_dim)).to(self.device)
        logger.info("loaded CLIP %s on %s as %s", spec.model, self.device, spec.dtype)

    def score(self, prompts: list[str | None], videos: list[np.ndarray]) -> list[dict]:
        """The score columns of each video (see the module docstring), from one batched pass."""
        if len(prompts) != len(videos):
            raise ValueError(f"{len(prompts)} prompts for {len(videos)} videos")
        for video in videos:
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not len(video):
                raise ValueError(f"videos must be uint8 (F, H, W, 3) with F >= 1, got "
                                 f"{video.dtype} {video.shape}: score encode.to_uint8(frames)")
        if not videos:
            return []
        with torch.inference_mode():
            images = self._image_embeddings([frame for video in videos for frame in video])
            texts = self._text_embeddings(sorted({p for p in prompts if p is not None}))
        rows, start = [], 0
        for prompt, video in zip(prompts, videos):
            frames = images[start:start + len(video)]
            start += len(video)
            rows.append(self._columns(frames, None if prompt is None else texts[prompt]))
        return rows

    def _image_embeddings(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Unit-length image embeddings (N, D) in float32, ``batch_frames`` frames at a time."""
        out = []
        for start in range(0, len(frames), self.spec.batch_frames):
            chunk = frames[start:start + self.spec.batch_frames]
            pixels = self.image_processor(images=chunk, return_tensors="pt",
                                          input_data_format="channels_last")["pixel_values"]
            pixels = pixels.to(self.device, self.model.dtype)
            out.append(_unit(_features(self.model.get_image_features(pixel_values=pixels))))
        return torch.cat(out).cpu()

    def _text_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Unit-length text embeddings by prompt; each distinct prompt is encoded once."""
        if not prompts:
            return {}
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        tokens = {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask")}
        features = self.model.get_text_features(**tokens)
        return dict(zip(prompts, _unit(_features(features)).cpu()))

    def _columns(self, frames: torch.Tensor, text: torch.Tensor | None) -> dict:
        """One video's columns from its frames' (F, D) and its prompt's (D,) unit embeddings."""
        row = dict.fromkeys(COLUMNS)
        row["clip_embedding"] = [float(x) for x in _unit(frames.mean(0, keepdim=True))[0].half()]
        if self.aesthetic is not None:
            from rendering.aesthetic import score_frames

            picked = frames[score_frames(len(frames))].to(self.device)
            row["aesthetic_score"] = float(self.aesthetic(picked).mean())
        if len(frames) > 1:
            row["clip_temporal_consistency"] = float((frames[:-1] * frames[1:]).sum(-1).mean())
        if text is not None:
            scores = (100.0 * (frames @ text)).clamp(min=0.0)
            worst = int(scores.argmin())  # torch returns the first index of the minimum
            row.update(clip_scores=[float(s) for s in scores], clip_score=float(scores.mean()),
                       clip_score_min=float(scores[worst]), clip_worst_frame=worst,
                       clip_drift_frames=int((scores < self.spec.drift_threshold).sum()))
        return row


def _features(output) -> torch.Tensor:
    """The projected embeddings: transformers 5 returns an output object, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Embeddings scaled to unit length in float32, so dot products are cosines in any dtype."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def _pil_image_processor_class():
    """CLIP's PIL image processor: ``CLIPImageProcessorPil`` in transformers 5 (where the plain
    name is torchvision's when that is installed), ``CLIPImageProcessor`` before."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def build_tiny_clip(initializer_factor: float = 1.0):
    """A seeded random-weight CLIP (model, image processor, tokenizer) built offline, for tests
    and the demo; small images (32 px) keep it at milliseconds per video on a CPU. At the default
    initialization every picture embeds nearly alike (cosines over 0.999); a larger
    ``initializer_factor`` (5) tells pictures apart, as near-duplicate tests need."""
    from transformers import CLIPConfig, CLIPModel

    from rendering.pipelines.tiny_components import clip_tokenizer

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer),
                         hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2, image_size=TINY_IMAGE_SIZE, patch_size=4,
                           initializer_factor=initializer_factor),
        projection_dim=32, initializer_factor=initializer_factor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        model = CLIPModel(config)
    processor = _pil_image_processor_class()(size={"shortest_edge": TINY_IMAGE_SIZE},
                                             crop_size=TINY_IMAGE_SIZE)
    return model.eval(), processor, tokenizer


def save_tiny_clip(directory: str, initializer_factor: float = 1.0) -> None:
    """Write ``tiny:clip`` (or its twin of another ``initializer_factor``) as a CLIP model
    folder (safetensors), loadable as a local folder."""
    from transformers import CLIPProcessor

    from rendering.pipelines.weights import quiet_progress_bars

    model, image_processor, tokenizer = build_tiny_clip(initializer_factor)
    with quiet_progress_bars():
        model.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def load_clip(folder: str, dtype: torch.dtype):
    """(model, image processor, tokenizer) from a local CLIP folder: safetensors weights only, no
    remote code, the PIL image processor."""
    import transformers
    from packaging.version import Version
    from transformers import CLIPModel, CLIPTokenizer

    from rendering.pipelines.weights import quiet_progress_bars

    # transformers 4.56 renamed torch_dtype to dtype; before it, dtype= is not read.
    keyword = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    _complete(folder, folder)  # refuse .bin-only folders before transformers looks at them
    with quiet_progress_bars():
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False,
                                          **{keyword: dtype})
    return model, _pil_image_processor_class().from_pretrained(folder), \
        CLIPTokenizer.from_pretrained(folder)


def _download_clip(spec: ScoringSpec, local_files_only: bool) -> str:
    """A CLIP model's config, processor, tokenizer and safetensors files in the hub cache (the
    node-local fetch around it is model_cache's, as for pipelines)."""
    return model_cache.transformers_snapshot(f"scoring model {spec.model!r}", spec.model,
                                             spec.revision, _HUB_FILES, local_files_only)


def _complete(name: str, folder: str) -> str:
    """``folder`` if it holds a CLIP config and safetensors weights (all reelfarm loads)."""
    return model_cache.transformers_folder(f"scoring model {name!r}", folder)
