"""A text stage's worker: rewrites a shard's prompts with a causal LM and stores each row's
rewrite as its artifact, under the same receipts and commit protocol as a keyframe.

For a shard (the steps of ``render_shard``):

1. Each row's cache key (``cache.rewrite_key``: its engine too, unless it is transformers,
   whose keys were written before there was a choice); the texts already known, from this
   worker's memory or the cache, are hits. A shard's rows are looked up and generated under
   one lock, so two shards on one worker never generate the same chat twice.
2. The distinct keys left are generated ``batch_size`` at a time, one ``generate`` call of the
   stage's ``engine`` (transformers or vLLM: the same calls and results) per batch (a failing
   batch is retried a chat at a time, so a poison row fails alone), and put in the cache.
3. Each row's text is judged (``judge.rewrite``: cleaned, trimmed to the video model's prompt
   limit); an unusable one (empty, too long, not text) falls back to the row's own prompt with
   the reason recorded, or fails the row as ``invalid_rewrite`` (``on_bad_rewrite: fail``).
   The row's artifact, ``<stage folder>/<key>.json``, is stored whole, then its receipt.

The artifact holds what the next stage needs and what the manifest records (the rewritten
prompt, the model, the system prompt's sha256, the fallback's reason, the engine unless it is
transformers), and nothing that depends on the run (a cache hit is not in it), so the same
config and input give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from rendering import storage
from rendering.contract import Artifact, Result, Task, TextSpec, WorkerSpec, receipt_json
from rendering.text.cache import RewriteCache, rewrite_key
from rendering.text.judge import rewrite

logger = logging.getLogger(__name__)

KIND = "text"  # the artifact's kind: a later stage takes it as its prompt
_MEMORY_ROWS = 65536  # texts a worker remembers (a few MB), ahead of the cache's reads
_IO_THREADS = 4  # artifacts and receipts are small: stored a few at a time
DEFAULT_ENGINE = "transformers"  # the engine before there was a choice: named in no key or record


def artifact_metrics(record: dict) -> dict:
    """The manifest's rewrite columns, from a row's stored artifact (its JSON)."""
    model = record["model"] + (f"@{record['revision']}" if record.get("revision") else "")
    return {"rewritten_prompt": record["rewritten_prompt"], "rewrite_model": model,
            "rewrite_system_prompt_sha256": record["system_prompt_sha256"],
            "rewrite_fallback": record["fallback"]}


class TextRewriter:
    """One causal LM and its cache, turning shards of tasks into stored rewrites."""

    def __init__(self, spec: WorkerSpec, device: str):
        from rendering.text.generate import Sampling
        from rendering.text.limit import prompt_limit

        self.spec, self.text = spec, spec.text
        self.lm = engine(spec, device)
        self.model_class = self.lm.model_class
        text = self.text
        self.limit = prompt_limit(text.limit_model, text.max_prompt_tokens) \
            if text.limit_model is not None else None
        self.cache = RewriteCache(text.cache_uri) if text.cache_uri else None
        self.sampling = Sampling(text.max_new_tokens, text.temperature, text.top_p, text.top_k)
        self._memory: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="store")
        self._fs, self._root = storage.filesystem(spec.output_uri)
        self.generated = 0  # chats this worker generated (the rest were hits)
        if self.limit is not None:
            logger.info("rewrites are fitted to %d tokens of %s's prompt tokenizer",
                        self.limit.tokens, text.limit_model.path)

    def key(self, task: Task) -> str:
        return task_key(self.spec, task)

    def render_shard(self, tasks: list[Task]) -> list[Result]:
        """Rewrite, judge and store every task; results in the order of ``tasks``."""
        keys = [self.key(task) for task in tasks]
        with self._lock:
            started = time.monotonic()
            known = {k: self._known(k) for k in dict.fromkeys(keys)}
            lookup_s = (time.monotonic() - started) / max(1, len(tasks))
            hits = {k for k, text in known.items() if text is not None}
            first = {k: t for k, t in reversed(list(zip(keys, tasks)))}  # a key's first task
            missing = [k for k in known if k not in hits]
            seconds = self._generate([first[k] for k in missing], missing, known)
        futures = [self._io.submit(self._store, task, key, known[key], key in hits,
                                   {"render_s": lookup_s + seconds.get(key, 0.0)})
                   for task, key in zip(tasks, keys)]
        return [_stored(task, future) for task, future in zip(tasks, futures)]

    def _known(self, key: str) -> tuple[str, bool] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        found = self.cache.get(key) if self.cache is not None else None
        if found is not None:
            self._remember(key, found)
        return found

    def _remember(self, key: str, generated: tuple[str, bool]) -> None:
        self._memory[key] = generated
        while len(self._memory) > _MEMORY_ROWS:
            self._memory.popitem(last=False)

    def _generate(self, tasks: list[Task], keys: list[str],
                  known: dict[str, tuple[str, bool] | Exception | None],
                  size: int | None = None) -> dict[str, float]:
        """Generate each key's text (its first task's chat) into ``known``, ``size`` (default
        ``batch_size``) at a time; a chat that fails alone gets its exception. Seconds per key,
        its batch's share."""
        seconds: dict[str, float] = {}
        size = size or max(1, self.spec.batch_size)
        for start in range(0, len(tasks), size):
            batch, batch_keys = tasks[start:start + size], keys[start:start + size]
            started = time.monotonic()
            try:
                made = self.lm.generate(self.text.system_prompt, [t.prompt for t in batch],
                                        [t.seed for t in batch], self.sampling)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row result
                if len(batch) == 1:
                    known[batch_keys[0]] = exc
                    continue
                logger.warning("a batch of %d rewrites failed (%s); generating them one by one",
                               len(batch), exc)
                seconds.update(self._generate(batch, batch_keys, known, size=1))
                continue
            share = (time.monotonic() - started) / len(batch)
            for key, generated in zip(batch_keys, made):
                known[key] = (generated.text, generated.finished)
                seconds[key] = share
                self._remember(key, known[key])
                if self.cache is not None:
                    self.cache.put(key, generated.text, generated.finished)
            self.generated += len(batch)
        return seconds

    def _store(self, task: Task, key: str, generated, hit: bool, timings: dict) -> Result:
        """Judge the row's text, store its artifact and receipt: its result."""
        if isinstance(generated, Exception):
            return Result.failure(task.id, "render_error",
                                  f"{type(generated).__name__}: {generated}",
                                  retryable=not isinstance(generated, ValueError))
        text, ended = generated
        counted = self.limit.count if self.limit is not None else None
        made, reason = rewrite(text, ended, counted, self.limit.tokens if self.limit else None)
        model = self.spec.model
        record = {"id": task.id, "seed": task.seed, "prompt": task.prompt,
                  "rewritten_prompt": task.prompt if reason else made, "generated": text,
                  "fallback": reason, "model": model.path, "revision": model.revision,
                  "system_prompt_sha256": self.text.system_prompt_sha256, "cache_key": key,
                  **_engine_named(self.text)}
        metrics = {**artifact_metrics(record), "rewrite_cache_hit": hit}
        if reason and self.text.on_bad_rewrite == "fail":
            return Result.failure(task.id, "invalid_rewrite",
                                  f"the rewrite is {reason.replace('_', ' ')} "
                                  f"(on_bad_rewrite: fail)", retryable=False,
                                  metrics={**metrics, "rewritten_prompt": None})
        if reason:
            logger.info("%s: the rewrite is %s; the row's own prompt is rendered", task.id,
                        reason.replace("_", " "))
        body = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8",
                                                                               "surrogatepass")
        relative = f"{self.spec.artifact_dir}/{task.key}.json"
        started = time.monotonic()
        try:
            storage.with_retries(f"upload of {relative}", storage.write_bytes, self._fs,
                                 storage.join(self._root, relative), body)
        except Exception as exc:  # noqa: BLE001
            return Result.failure(task.id, "upload_error", f"{type(exc).__name__}: {exc}",
                                  retryable=True)
        timings["upload_s"] = time.monotonic() - started
        artifact = Artifact(self.spec.artifact_name, relative, len(body),
                            hashlib.sha256(body).hexdigest(), KIND)
        result = Result(id=task.id, ok=True, artifacts=[artifact], metrics=metrics,
                        timings_s=timings)
        receipt = storage.join(self._root, self.spec.receipts_dir, task.key + ".json")
        try:  # best effort: without it the row is rewritten again (from the cache)
            storage.write_bytes(self._fs, receipt, receipt_json(task, result))
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not write the receipt of %s: %s", task.key, exc)
        return result


def task_key(spec: WorkerSpec, task: Task) -> str:
    """A task's rewrite cache key: its prompt, the model, the system prompt, the settings that
    decide the text, and its seed when sampling (greedy text does not depend on it)."""
    text, model = spec.text, spec.model
    settings = {"max_new_tokens": text.max_new_tokens, "temperature": text.temperature,
                "top_p": text.top_p, "top_k": text.top_k, "dtype": model.dtype,
                **_engine_named(text)}
    return rewrite_key(task.prompt, model.path, model.revision, text.system_prompt, settings,
                       None if text.temperature == 0 else task.seed)


def _engine_named(text: TextSpec) -> dict:
    """The engine, for a key's settings and an artifact: none for transformers, so the keys and
    records made before there was a choice stay as they were."""
    return {} if text.engine == DEFAULT_ENGINE else {"engine": text.engine}


def engine(spec: WorkerSpec, device: str):
    """The stage's engine, loaded: ``generate.CausalLM`` (transformers) or
    ``vllm_engine.VllmLM``, each with ``generate(system, prompts, seeds, sampling)`` and
    ``model_class``."""
    name = spec.text.engine
    if name == "vllm":
        from rendering.text.vllm_engine import VllmLM

        return VllmLM(spec.model, device, spec.text.gpu_fraction)
    if name != DEFAULT_ENGINE:
        raise ValueError(f"text.engine {name!r}: choose transformers or vllm")
    from rendering.text.generate import CausalLM

    return CausalLM(spec.model, device)


def _stored(task: Task, future) -> Result:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a row's failure, never the shard's
        return Result.failure(task.id, "upload_error", f"{type(exc).__name__}: {exc}",
                              retryable=True)
