"""One render worker: holds a loaded pipeline and turns a shard of rows into stored videos.

The worker knows nothing of Ray: the cluster layer wraps it as an actor in one place. Its
lifecycle is explicit: a cheap constructor, ``setup()`` to load the model (run where the GPU
is), ``render_shard()`` to do work. ``render_shard`` never raises: every row comes back as
a ``RenderResult``.

Rendering holds a lock while encoding and uploading run on a small thread pool, so the next
batch (or the next shard, when the actor accepts two calls at once) renders while the last
one is encoded and stored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby

import numpy as np

from rendering import storage
from rendering.encode import encode_video, to_uint8
from rendering.specs import RenderResult, RenderTask, WorkerSpec, receipt_json

logger = logging.getLogger(__name__)

# Encode + upload of one batch usually takes less time than rendering the next one; two
# threads keep both the encoder and the network busy without oversubscribing a CPU worker.
_IO_THREADS = 2


class ShardRenderer:
    """Render shards of rows to videos on object storage, one loaded pipeline per instance."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._pipe = None
        self._device = None
        self._render_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._load_info: dict | None = None
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="encode")
        self._fs, self._videos_path = storage.filesystem(spec.videos_uri)
        self._receipts_path = storage.filesystem(spec.receipts_uri)[1]

    def setup(self) -> dict:
        """Load the model once. Runs inside the worker process, after the GPU has been assigned.

        Safe to call from several threads: a shard that arrives while the model loads waits.
        """
        with self._load_lock:
            if self._load_info is None:
                import torch

                from rendering.pipeline import load_pipeline, pick_device

                if self.spec.torch_threads:
                    torch.set_num_threads(self.spec.torch_threads)
                self._device = pick_device()
                started = time.monotonic()
                self._pipe = load_pipeline(self.spec.model, self._device, self.spec.optimize)
                self._load_info = {"device": self._device, "pid": os.getpid(),
                                   "load_s": round(time.monotonic() - started, 3)}
            return self._load_info

    def render_shard(self, tasks: list[RenderTask]) -> list[RenderResult]:
        """Render, encode and upload every row; results come back in the order of ``tasks``."""
        from rendering.pipeline import prompts_truncated

        self.setup()
        with self._render_lock:  # a tokenizer must not be shared between threads
            truncated = prompts_truncated(self._pipe, [t.prompt for t in tasks])
        pending: list[tuple[RenderTask, Future | RenderResult]] = []
        for batch in self._batches(tasks):
            for task, outcome in zip(batch, self._render(batch)):
                if isinstance(outcome, RenderResult):
                    pending.append((task, outcome))
                else:
                    frames, render_s = outcome
                    pending.append((task, self._io.submit(self._store, task, frames, render_s)))
        by_id = {task.id: _stored(task, outcome) for task, outcome in pending}
        return [dataclasses.replace(by_id[t.id], prompt_truncated=flag)
                for t, flag in zip(tasks, truncated)]

    def _batches(self, tasks: list[RenderTask]):
        """Group rows of equal shape (kept in input order within a group) into batches."""
        ordered = sorted(tasks, key=lambda t: repr(t.batch_key))
        for _, group in groupby(ordered, key=lambda t: repr(t.batch_key)):
            group = list(group)
            for i in range(0, len(group), self.spec.batch_size):
                yield group[i:i + self.spec.batch_size]

    def _render(self, batch: list[RenderTask]) -> list:
        """Frames per row, or a failure; a failing batch is retried row by row.

        Retrying alone isolates a poison row: it fails by itself and its batch mates render.
        A shape the model cannot make fails the batch's rows before any GPU time is spent.
        """
        from rendering.pipeline import render_batch, shape_problem

        first = batch[0]
        problem = shape_problem(self._pipe, first.num_frames, first.height, first.width)
        if problem:
            return [RenderResult.failure(t.id, "invalid_shape", problem, retryable=False)
                    for t in batch]
        try:
            with self._render_lock:
                started = time.monotonic()  # not the wait for the other shard's batch
                frames = render_batch(self._pipe, batch)
                render_s = time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row result
            if len(batch) > 1:
                logger.warning("batch of %d failed (%s); retrying its rows one by one",
                               len(batch), exc)
                return [outcome for task in batch for outcome in self._render([task])]
            return [_render_failure(batch[0], exc)]
        return [(frames[i], render_s / len(batch)) for i in range(len(batch))]

    def _store(self, task: RenderTask, frames: np.ndarray, render_s: float) -> RenderResult:
        """Encode to a local temp file, check it, and publish it atomically."""
        timings = {"render_s": render_s}
        path = storage.join(self._videos_path, task.key + ".mp4")
        # A failed clean-up of the temp folder must not fail a video that is already stored.
        with tempfile.TemporaryDirectory(prefix="reelfarm-", ignore_cleanup_errors=True) as tmp:
            local = os.path.join(tmp, "video.mp4")
            started = time.monotonic()
            try:
                encode_video(to_uint8(frames), local, task.fps, self.spec.encode)
            except Exception as exc:  # noqa: BLE001
                return RenderResult.failure(task.id, "encode_error", str(exc), retryable=True)
            timings["encode_s"] = time.monotonic() - started
            size = os.path.getsize(local)
            digest = storage.sha256_file(local)
            started = time.monotonic()
            try:
                storage.with_retries(f"upload of {task.key}", storage.upload_file, local,
                                     self._fs, path)
            except Exception as exc:  # noqa: BLE001
                return RenderResult.failure(task.id, "upload_error",
                                            f"{type(exc).__name__}: {exc}", retryable=True)
            timings["upload_s"] = time.monotonic() - started
        result = RenderResult(id=task.id, ok=True, video_uri=storage.to_uri(self._fs, path),
                              bytes=size, sha256=digest, timings_s=timings)
        self._write_receipt(task, result)
        return result

    def _write_receipt(self, task: RenderTask, result: RenderResult) -> None:
        """Leave proof that the video is durable, so a crash before the shard commits does
        not cost a re-render. Best effort: without it the row is simply rendered again."""
        path = storage.join(self._receipts_path, task.key + ".json")
        try:
            storage.write_bytes(self._fs, path, receipt_json(task, result))
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not write the receipt of %s: %s", task.key, exc)


def _stored(task: RenderTask, outcome: Future | RenderResult) -> RenderResult:
    """The row's result; a local disk failure around the encode (a full or read-only temp
    folder) fails the row, not the shard."""
    if isinstance(outcome, RenderResult):
        return outcome
    try:
        return outcome.result()
    except Exception as exc:  # noqa: BLE001
        return RenderResult.failure(task.id, "encode_error", f"{type(exc).__name__}: {exc}",
                                    retryable=True)


def _render_failure(task: RenderTask, exc: Exception) -> RenderResult:
    # diffusers' check_inputs raises ValueError for requests the model cannot take: retrying
    # them elsewhere would fail the same way.
    retryable = not isinstance(exc, ValueError)
    return RenderResult.failure(task.id, "render_error", f"{type(exc).__name__}: {exc}",
                                retryable=retryable)
