"""One render worker: holds a loaded pipeline and turns a shard of tasks into stored videos.

The worker knows nothing of Ray: the cluster layer wraps it as an actor in one place. Its
lifecycle is explicit: a cheap constructor, ``setup()`` to load the model (run where the GPU
is), ``render_shard()`` to do work. ``render_shard`` never raises: every task comes back as
a ``Result``.

What differs between pipeline families (inputs, shape rules, batching, call kwargs) comes from
the pipeline's adapter; this module only orders the work. Rendering holds a lock while
encoding and uploading run on a small thread pool, so the next batch (or the next shard, when
the actor accepts two calls at once) renders while the last one is encoded and stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby

import numpy as np

from rendering import quality, storage
from rendering.contract import Artifact, Result, Task, WorkerSpec, receipt_json
from rendering.encode import encode_image, encode_video, to_uint8
from rendering.media import MediaError
from rendering.media.images import load_image
from rendering.media.videos import load_video

logger = logging.getLogger(__name__)

# Encode + upload of one batch usually takes less time than rendering the next one; two
# threads keep both the encoder and the network busy without oversubscribing a CPU worker.
_IO_THREADS = 2


class ShardRenderer:
    """Render shards of tasks to videos on object storage, one loaded pipeline per instance."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._pipe = None
        self._adapter = None
        self._scorer = None  # a ClipScorer when the job scores its videos
        self._text = None  # a text stage's TextRewriter, in place of the pipeline
        self._render_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._load_info: dict | None = None
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="encode")
        self._fs, self._root = storage.filesystem(spec.output_uri)

    def setup(self) -> dict:
        """Load the model once. Runs inside the worker process, after the GPU has been assigned.

        Safe to call from several threads: a shard that arrives while the model loads waits.
        """
        with self._load_lock:
            if self._load_info is None:
                import torch

                from rendering.pipelines import adapter_for, final_stage_problem
                from rendering.pipelines.load import load_pipeline, pick_device

                if self.spec.torch_threads:
                    torch.set_num_threads(self.spec.torch_threads)
                device = pick_device()
                started = time.monotonic()
                if self.spec.text is not None:  # a text stage: a causal LM, no pipeline
                    from rendering.text.worker import TextRewriter

                    self._text = TextRewriter(self.spec, device)
                    self._load_info = {"device": device, "pid": os.getpid(),
                                       "pipeline": self._text.model_class,
                                       "load_s": round(time.monotonic() - started, 3),
                                       "probe": self._store_probe()}
                    return self._load_info
                self._pipe = load_pipeline(self.spec.model, device, self.spec.optimize)
                self._adapter = adapter_for(self._pipe)
                problem = final_stage_problem(self._adapter) if self.spec.final else None
                if problem:
                    raise ValueError(problem)
                if self.spec.scoring is not None:
                    from rendering.scoring import ClipScorer

                    self._scorer = ClipScorer(self.spec.scoring, device)
                self._load_info = {"device": device, "pid": os.getpid(),
                                   "pipeline": type(self._pipe).__name__,
                                   "load_s": round(time.monotonic() - started, 3),
                                   "probe": self._store_probe()}
            return self._load_info

    def _store_probe(self) -> str | None:
        """Store a small object under the output for the driver to read back, and return its
        key: a local path that is not one shared folder (workers on other machines, or in
        other folders) is found at start, not after a night of videos went elsewhere."""
        if self.spec.probes_dir is None:
            return None
        key = f"{self.spec.probes_dir}/{uuid.uuid4().hex}.json"
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        storage.with_retries(f"store {key}", storage.write_bytes, self._fs,
                             storage.join(self._root, key), body)
        return key

    def render_shard(self, tasks: list[Task]) -> list[Result]:
        """Render, encode and upload every task; results come back in the order of ``tasks``."""
        from rendering.pipelines.load import prompts_truncated

        self.setup()
        if self._text is not None:
            return self._text.render_shard(tasks)
        with self._render_lock:  # a tokenizer must not be shared between threads
            truncated = prompts_truncated(self._pipe, [t.prompt for t in tasks]) \
                if self._adapter.takes_prompt else [None] * len(tasks)
        pending: list[tuple[Task, Future | Result]] = []
        for batch in self._batches(tasks):
            outcomes = self._checked(batch)
            if self._scorer is not None:
                outcomes = [self._judge(task, outcome) for task, outcome in
                            zip(batch, self._scored(batch, outcomes))]
            for task, outcome in zip(batch, outcomes):
                if isinstance(outcome, Result):
                    pending.append((task, outcome))
                else:
                    frames, render_s, metrics = outcome
                    pending.append((task, self._io.submit(self._store, task, frames, render_s,
                                                          metrics)))
        by_id = {task.id: _stored(task, outcome) for task, outcome in pending}
        peak = self._gpu_memory_peak()
        results = []
        for task, flag in zip(tasks, truncated):
            result = by_id[task.id]
            results.append(dataclasses.replace(result, metrics={
                **result.metrics, "prompt_truncated": flag,
                **({"gpu_memory_peak_bytes": peak} if peak is not None else {})}))
        return results

    def _gpu_memory_peak(self) -> int | None:
        """The most CUDA memory this worker has allocated so far (None off CUDA): how close a
        model and batch size run to the card's limit."""
        if not str(self._load_info["device"]).startswith("cuda"):
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(self._load_info["device"]))

    def _batches(self, tasks: list[Task]):
        """Group tasks of one batch key (kept in input order within a group) into batches of
        what the adapter allows."""
        size = self._adapter.batch_limit(self.spec.batch_size)
        ordered = sorted(tasks, key=lambda t: repr(t.batch_key))
        for _, group in groupby(ordered, key=lambda t: repr(t.batch_key)):
            group = list(group)
            for i in range(0, len(group), size):
                yield group[i:i + size]

    def _render(self, batch: list[Task]) -> list:
        """(frames, seconds, metrics) per task, or a failure; a failing batch is retried task by
        task. Retrying alone isolates a poison row: it fails by itself and its batch mates
        render. A shape the model cannot make, a missing or unreadable input fail their rows
        before any GPU time is spent."""
        from rendering.pipelines.load import render_flagged

        params = batch[0].params
        problem = self._adapter.shape_problem(self._pipe, params["num_frames"], params["height"],
                                              params["width"])
        if problem:
            return [Result.failure(t.id, "invalid_shape", problem, retryable=False) for t in batch]
        outcomes: dict[str, Result] = {}
        loaded: list[tuple[Task, dict, dict]] = []
        for task in batch:
            outcome = self._inputs(task)
            if isinstance(outcome, Result):
                outcomes[task.id] = outcome
            else:
                loaded.append((task, *outcome))
        if loaded:
            tasks = [t for t, _, _ in loaded]
            try:
                with self._render_lock:
                    started = time.monotonic()  # not the wait for the other shard's batch
                    frames, flags = render_flagged(self._pipe, self._adapter, tasks,
                                                   [m for _, m, _ in loaded])
                    render_s = time.monotonic() - started
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row result
                if len(tasks) > 1:
                    logger.warning("batch of %d failed (%s); retrying its rows one by one",
                                   len(tasks), exc)
                    for task in tasks:
                        outcomes[task.id] = self._render([task])[0]
                else:
                    outcomes[tasks[0].id] = _render_failure(tasks[0], exc)
            else:
                for i, (task, _, metrics) in enumerate(loaded):
                    outcomes[task.id] = (frames[i], render_s / len(tasks),
                                         {**metrics, "safety_flagged": flags[i]})
        return [outcomes[t.id] for t in batch]

    def _checked(self, batch: list[Task]) -> list:
        """``_render``, with quality.on_unsafe applied to each row: what is scored and stored
        has passed the pipeline's safety checker, or is kept flagged."""
        return [self._safe(task, outcome) for task, outcome in zip(batch, self._render(batch))]

    def _safe(self, task: Task, outcome):
        """Deal with a picture the safety checker flagged (and blacked out): keep it, marked
        and logged; fail the row as unsafe_content; or render it again alone with new seeds,
        up to unsafe_max_tries renders, and fail it if every one is flagged. A failed row goes
        no further, so a black keyframe never reaches the next stage unrecorded."""
        on_unsafe, renders = self.spec.on_unsafe, [outcome]
        while on_unsafe == "retry" and _flagged(renders[-1]) \
                and len(renders) < self.spec.unsafe_max_tries:
            seed = quality.retry_seed(task.seed, len(renders) + 1, "unsafe")
            renders.append(self._render([dataclasses.replace(task, seed=seed)])[0])
        if isinstance(renders[-1], Result) or renders[-1][2]["safety_flagged"] is None:
            return renders[-1]
        frames, _, metrics = renders[-1]
        if on_unsafe == "retry":
            metrics = {**metrics, "safety_retries": len(renders) - 1}
        render_s = sum(r[1] for r in renders)  # those before the last were all flagged renders
        if not metrics["safety_flagged"] or on_unsafe == "keep":
            if metrics["safety_flagged"]:
                logger.warning("%s: the safety checker flagged its picture (blacked out); kept, "
                               "as quality.on_unsafe is keep", task.id)
            return frames, render_s, metrics
        tries = f"all {len(renders)} renders" if on_unsafe == "retry" else "the picture"
        return Result.failure(task.id, "unsafe_content", f"the pipeline's safety checker "
                              f"flagged {tries} (quality.on_unsafe: {on_unsafe})",
                              retryable=False, metrics=metrics)

    def _scored(self, batch: list[Task], outcomes: list) -> list:
        """Each rendered row's scores (of the pixels that will be encoded) in its metrics: CLIP,
        embedding and aesthetic on the device, then motion on the CPU, outside the lock, so the
        other shard's batch renders meanwhile."""
        from rendering.motion import motion_columns

        rendered = [i for i, o in enumerate(outcomes) if not isinstance(o, Result)]
        if not rendered:
            return outcomes
        pixels = [to_uint8(outcomes[i][0]) for i in rendered]
        with self._render_lock:  # the scorer shares the device with the pipeline
            started = time.monotonic()  # not the wait for the other shard's batch
            scores = self._scorer.score([batch[i].prompt for i in rendered], pixels)
            score_s = time.monotonic() - started
        started = time.monotonic()
        for score, video in zip(scores, pixels):
            score.update(motion_columns(video, self.spec.scoring.static_threshold))
        score_s = (score_s + time.monotonic() - started) / len(rendered)
        outcomes = list(outcomes)
        for i, score in zip(rendered, scores):
            frames, render_s, metrics = outcomes[i]
            outcomes[i] = (frames, render_s, {**metrics, **score, "score_s": score_s})
        return outcomes

    def _judge(self, task: Task, outcome):
        """Apply the quality gate's rules (rendering.quality): keep a row that misses them
        (marked), fail it, or render it again with new seeds, up to max_tries, keeping the best
        try. Every try is recorded."""
        gate = self.spec.gate
        if gate is None or isinstance(outcome, Result) or not quality.judged(outcome[2], gate):
            return outcome
        tries, seeds = [outcome], [task.seed]

        def best() -> int:
            return quality.kept_try([None if isinstance(t, Result) else t[2] for t in tries], gate)

        while len(tries) < gate.max_tries and quality.wants_retry(tries[best()][2], gate):
            seeds.append(quality.retry_seed(task.seed, len(tries) + 1))
            retry = dataclasses.replace(task, seed=seeds[-1])
            tries.append(self._scored([retry], self._checked([retry]))[0])
        kept = best()
        frames, _, metrics = tries[kept]
        passed, missed, failure = quality.verdict(metrics, gate)
        metrics = {**metrics, "quality_passed": passed, "quality_failed_rules": missed,
                   "quality_kept_try": kept,
                   "quality_tries": [{"seed": s, "clip_score": c}
                                     for s, c in zip(seeds, _scores(tries))]}
        render_s = sum(t[1] for t in tries if not isinstance(t, Result))
        metrics["score_s"] = sum(t[2]["score_s"] for t in tries if not isinstance(t, Result))
        if failure is not None:
            return Result.failure(task.id, *failure, retryable=False, metrics=metrics)
        return frames, render_s, metrics

    def _inputs(self, task: Task) -> tuple[dict, dict] | Result:
        """The task's conditioning media, decoded at its shape, and each one's sha256."""
        problem = self._adapter.task_problem(task)
        if problem:
            return Result.failure(task.id, *problem, retryable=False)
        params, loaded, metrics = task.params, {}, {}
        for role, source in task.inputs.items():
            try:
                if role == "image":
                    value, digest = load_image(source, self.spec.media, params["width"],
                                               params["height"])
                else:
                    value, digest = load_video(source, self.spec.media, params["num_frames"],
                                               params["width"], params["height"])
            except MediaError as exc:  # bad media, or storage trouble another try may fix
                code = "media_error" if exc.retryable else "invalid_media"
                return Result.failure(task.id, code, f"{role}: {exc}", retryable=exc.retryable)
            loaded[role] = value
            metrics[f"input_{role}_sha256"] = digest
        return loaded, metrics

    def _store(self, task: Task, frames: np.ndarray, render_s: float, metrics: dict) -> Result:
        """Encode to a local temp file, check it, and publish it atomically."""
        metrics = dict(metrics)
        timings = {"render_s": render_s, **({"score_s": metrics.pop("score_s")}
                                            if "score_s" in metrics else {})}
        # A failed clean-up of the temp folder must not fail a video that is already stored.
        with tempfile.TemporaryDirectory(prefix="reelfarm-", ignore_cleanup_errors=True) as tmp:
            pixels = to_uint8(frames)  # what is encoded, previewed and was scored
            started = time.monotonic()
            try:
                kind = self._adapter.makes  # "image" or "video": the artifact carries it
                if kind == "image":
                    local = os.path.join(tmp, "image.png")
                    encode_image(pixels[0], local)
                else:
                    local = os.path.join(tmp, "video.mp4")
                    encode_video(pixels, local, task.params["fps"], self.spec.encode)
                suffix = os.path.splitext(local)[1]
                files = {self.spec.artifact_name:
                         (local, f"{self.spec.artifact_dir}/{task.key}{suffix}", kind)}
                files.update(self._previews(task, pixels, tmp))
            except Exception as exc:  # noqa: BLE001
                return Result.failure(task.id, "encode_error", str(exc), retryable=True)
            timings["encode_s"] = time.monotonic() - started
            started = time.monotonic()
            artifacts = []
            try:
                for name, (path, relative, kind) in files.items():
                    storage.with_retries(f"upload of {relative}", storage.upload_file, path,
                                         self._fs, storage.join(self._root, relative))
                    artifacts.append(Artifact(name, relative, os.path.getsize(path),
                                              storage.sha256_file(path), kind))
            except Exception as exc:  # noqa: BLE001
                return Result.failure(task.id, "upload_error", f"{type(exc).__name__}: {exc}",
                                      retryable=True)
            timings["upload_s"] = time.monotonic() - started
        result = Result(id=task.id, ok=True, artifacts=artifacts, metrics=metrics, timings_s=timings)
        self._write_receipt(task, result)
        return result

    def _previews(self, task: Task, pixels: np.ndarray,
                  folder: str) -> dict[str, tuple[str, str, str]]:
        """The previews the job asks for, written locally: {name: (local path, output path,
        "preview")}."""
        if not self.spec.previews:
            return {}
        from rendering.previews import PreviewSpec, extension, write_previews

        spec = PreviewSpec(kinds=self.spec.previews, max_side=self.spec.preview_max_side)
        written = write_previews(pixels, task.params["fps"], spec, folder)
        return {kind: (path, f"{self.spec.previews_dir}/{task.key}.{extension(kind)}", "preview")
                for kind, path in written.items()}

    def _write_receipt(self, task: Task, result: Result) -> None:
        """Leave proof that the row's artifacts are durable, so a crash before the shard
        commits does not cost a re-render. Best effort: without it the row is rendered again."""
        path = storage.join(self._root, self.spec.receipts_dir, task.key + ".json")
        try:
            storage.write_bytes(self._fs, path, receipt_json(task, result))
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not write the receipt of %s: %s", task.key, exc)


def _flagged(outcome) -> bool:
    return not isinstance(outcome, Result) and bool(outcome[2]["safety_flagged"])


def _scores(tries: list) -> list[float | None]:
    return [None if isinstance(t, Result) else t[2]["clip_score"] for t in tries]


def _stored(task: Task, outcome: Future | Result) -> Result:
    """The task's result; a local disk failure around the encode (a full or read-only temp
    folder) fails the row, not the shard."""
    if isinstance(outcome, Result):
        return outcome
    try:
        return outcome.result()
    except Exception as exc:  # noqa: BLE001
        return Result.failure(task.id, "encode_error", f"{type(exc).__name__}: {exc}",
                              retryable=True)


def _render_failure(task: Task, exc: Exception) -> Result:
    # diffusers' check_inputs raises ValueError for requests the model cannot take: retrying
    # them elsewhere would fail the same way.
    retryable = not isinstance(exc, ValueError)
    return Result.failure(task.id, "render_error", f"{type(exc).__name__}: {exc}",
                          retryable=retryable)
