"""Receipts: rows whose video is durable but whose shard was not committed before a crash.

A worker writes ``receipts/<key>.json`` right after a row's artifacts are stored. On resume, a
row with a receipt that matches its task, and whose every artifact still has the recorded size
and sha256, is committed without being rendered again. Receipts are removed once their rows are committed.

In a multi-stage job each stage keeps its own (``receipts/<stage>/``): they are the stage's
commit, so a row whose keyframe is stored goes straight to the video stage on resume.
"""

from __future__ import annotations

import json

from jobs.store.layout import RECEIPTS_DIR
from rendering import storage
from rendering.contract import Artifact, Result, Task, read_receipt
from rendering.text.worker import KIND as TEXT_KIND, artifact_metrics


class Receipts:
    def __init__(self, output_uri: str, folder: str = RECEIPTS_DIR, artifact: str = "video"):
        self._fs, self._root = storage.filesystem(output_uri)
        self._dir = storage.join(self._root, folder)
        self._artifact = artifact  # what a receipt must hold to prove the row's stage done
        # Only uncommitted work leaves receipts, so this listing is bounded by work in flight.
        found = self._fs.find(self._dir) if self._fs.exists(self._dir) else []
        self._paths = {p.rsplit("/", 1)[-1][:-len(".json")]: p for p in found if p.endswith(".json")}

    def __len__(self) -> int:
        return len(self._paths)

    def recover(self, task: Task) -> Result | None:
        """The stored result for ``task`` if its receipt and its object prove it complete."""
        path = self._paths.get(task.key)
        if path is None:
            return None
        result = read_receipt(self._fs.cat_file(path), task)
        if result is None or result.artifact(self._artifact) is None:
            return None
        return result if storage.stored_intact(self._fs, self._root, result.artifacts) else None

    def recover_kept(self, task: Task, kept: list[Artifact]) -> Result | None:
        """A result from this stage's artifact among ``kept`` (what a committed row stored,
        ``jobs.run.records.kept_artifacts``), if the object still has its size and sha256."""
        mine = [a for a in kept if a.name == self._artifact]
        if not mine or not storage.stored_intact(self._fs, self._root, mine):
            return None
        metrics = {}
        if mine[0].kind == TEXT_KIND:  # a rewrite: the next stage's prompt is in it
            try:
                record = json.loads(self._fs.cat_file(storage.join(self._root, mine[0].path)))
                metrics = artifact_metrics(record)
            except (ValueError, KeyError, TypeError):
                return None
        return Result(id=task.id, ok=True, artifacts=mine, metrics=metrics)

    def remove(self, keys: list[str]) -> None:
        """Drop the receipts of committed rows (a leftover one is harmless, just untidy)."""
        for key in keys:
            self._paths.pop(key, None)
        storage.remove_all_quietly(self._fs, [storage.join(self._dir, k + ".json") for k in keys],
                                   "receipts")  # one that failed to write is missing

    def remove_all(self) -> None:
        """Once every row is committed, no receipt is needed any more."""
        if self._fs.exists(self._dir):
            self._fs.rm(self._dir, recursive=True)
        self._paths.clear()
