"""A causal language model held by a text-stage worker: what every engine shares (``Chats``:
the chat template, the end tokens, decoding) and the transformers engine, batched and seeded
per row.

The model is ``AutoModelForCausalLM`` with its tokenizer's chat template: a hub id (with a
revision), a local folder or an fsspec URL of one (fetched once per node, as pipelines are), or
``tiny:lm``; weights load from safetensors only and remote code is never run. A batch of rows is
one ``generate`` call: the chats are padded on the left (so every row's next token follows its
own last one) under an attention mask.

Sampling is per row: greedy (temperature 0), or a temperature / top-p / top-k draw whose noise
comes from a generator of the row's own, seeded from the row's seed (the Gumbel-max trick over
the filtered distribution: argmax(log p + Gumbel) is a draw from p). A row's text so does not
depend on which rows share its batch, nor on torch's global RNG, up to the floating-point
rounding a batch changes (as for ``render.batch_size``).

The other engine, vLLM (``rendering.text.vllm_engine``), takes the same chats and answers with
the same ``Generated``; an engine is an object with ``generate`` and ``model_class``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from rendering import model_cache
from rendering.contract import ModelSpec
from rendering.text import tiny

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a causal LM's folder holds that reelfarm loads: config, generation config, tokenizer files
# (tokenizer.json, sentencepiece models, vocab and merges), chat template, safetensors weights.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else a seeded draw per row."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Generated:
    """What the model wrote for one row: its text (special tokens left out) and whether it ended
    by itself (an end token) rather than at ``max_new_tokens``."""

    text: str
    finished: bool
    tokens: int


class Chats:
    """The tokenizer side of a causal LM, the same for every engine: the chat template that puts
    the system prompt and a row's prompt in their turns, the tokens that end the assistant's
    turn, and the text a row's new tokens decode to."""

    def __init__(self, name: str, tokenizer, generation_config):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{name}: its tokenizer has no chat template (an instruct or "
                             f"chat model has one; a base model cannot take a system prompt)")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:  # many causal LMs ship none: pad with the end token
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.end_ids = _end_ids(generation_config, tokenizer)

    def chat(self, system: str, prompt: str) -> str:
        """The model's input for one row: the system prompt and the row's prompt as the user's
        turn, in the tokenizer's chat template, ready for the assistant's answer."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def token_ids(self, system: str, prompts: list[str]) -> list[list[int]]:
        """Each row's chat as token ids (the template writes every special token itself)."""
        return self.tokenizer([self.chat(system, prompt) for prompt in prompts],
                              add_special_tokens=False)["input_ids"]

    def decoded(self, tokens: list[int], ended: bool | None = None) -> Generated:
        """A row's new tokens up to the first end token, as text; ``ended`` says whether it
        ended by itself when the engine left the end token out."""
        ends = [i for i, t in enumerate(tokens) if t in self.end_ids]
        kept = tokens[:ends[0]] if ends else tokens
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generated(text, finished=bool(ends) if ended is None else ended, tokens=len(kept))


class CausalLM:
    """The transformers engine: one causal language model and its tokenizer, loaded once per
    worker."""

    def __init__(self, spec: ModelSpec, device: str):
        dtype = torch_dtype(spec)
        self.spec = spec
        self.device = torch.device(device)
        if tiny.is_tiny_lm(spec.path):
            model, tokenizer = tiny.build_tiny_lm()
            model = model.to(dtype)
        else:
            model, tokenizer = load_causal_lm(model_folder(spec), dtype)
        self.chats = Chats(spec.path, tokenizer, model.generation_config)
        self.model = model.to(self.device).eval()
        self.model_class = type(model).__name__
        logger.info("loaded %s (%s) on %s as %s", spec.path, self.model_class, self.device,
                    spec.dtype)

    def generate(self, system: str, prompts: list[str], seeds: list[int],
                 sampling: Sampling) -> list[Generated]:
        """One ``generate`` call for the whole batch: the text each row's chat got."""
        from transformers import GenerationConfig, LogitsProcessorList

        tokenizer = self.chats.tokenizer
        chats = [self.chats.chat(system, prompt) for prompt in prompts]
        encoded = tokenizer(chats, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(self.device)
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                  num_beams=1, eos_token_id=self.chats.end_ids,
                                  pad_token_id=tokenizer.pad_token_id)
        processors = LogitsProcessorList(
            [] if sampling.greedy else [RowSampler(seeds, sampling)])
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=config,
                                         logits_processor=processors)
        new = output[:, encoded["input_ids"].shape[1]:].tolist()
        return [self.chats.decoded(tokens) for tokens in new]


class RowSampler:
    """A logits processor that turns greedy search into sampling with one generator per row:
    the scores are scaled by the temperature, cut to the top-k and top-p tokens, and given
    Gumbel noise drawn from the row's generator, so the argmax greedy search then takes is a
    draw from the filtered distribution."""

    def __init__(self, seeds: list[int], sampling: Sampling):
        self.seeds, self.sampling = seeds, sampling
        self._generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.sampling
        if self._generators is None:  # on the device the scores are on
            self._generators = [torch.Generator(scores.device).manual_seed(seed)
                                for seed in self.seeds]
        logits = scores.float() / s.temperature
        if s.top_k is not None and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            # Keep the smallest set whose mass reaches top_p (the first token always).
            drop = cumulative - ordered.softmax(dim=-1) >= s.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
        logp = logits.log_softmax(dim=-1)
        noise = torch.stack([_gumbel(logits.shape[-1], g, logits.device)
                             for g in self._generators])
        return logp + noise


def _gumbel(size: int, generator: torch.Generator, device) -> torch.Tensor:
    uniform = torch.rand(size, generator=generator, device=device).clamp(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


def _end_ids(generation_config, tokenizer) -> list[int]:
    """Every token that ends the assistant's turn: the model's generation config's end tokens
    (a chat model's end-of-turn, such as Qwen's <|im_end|>) and the tokenizer's."""
    ids = generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model names no end token (generation_config.eos_token_id), and "
                         "neither does its tokenizer")
    return sorted(set(ids))


def torch_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype {spec.dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[spec.dtype]


def model_folder(spec: ModelSpec) -> str:
    """The local folder of a causal LM not built in memory: a hub snapshot at its revision, an
    fsspec URL's copy (fetched once per node, as pipelines are), or the folder itself."""
    if spec.path.startswith(tiny.TINY_PREFIX):
        raise ValueError(f"unknown tiny language model {spec.path!r}: the only one is "
                         f"{tiny.TINY_PREFIX}{tiny.TINY_LM_KINDS[0]}")
    return model_cache.resolve_folder(spec.path, spec.revision, functools.partial(_download, spec),
                                      marker="config.json", key="text model.path")


def load_causal_lm(folder: str, dtype: torch.dtype):
    """(model, tokenizer) from a transformers folder: safetensors only, no remote code."""
    from packaging.version import Version
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rendering.pipelines.weights import quiet_progress_bars

    model_cache.transformers_folder(f"text model {folder!r}", folder)
    keyword = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                     trust_remote_code=False, **{keyword: dtype})
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer


def _download(spec: ModelSpec, local_files_only: bool) -> str:
    """A causal LM's config, tokenizer, chat template and safetensors in the hub cache (the
    node-local fetch around it is model_cache's, as for pipelines)."""
    return model_cache.transformers_snapshot(f"text model {spec.path!r}", spec.path,
                                             spec.revision, _HUB_FILES, local_files_only)
