"""The rewrite cache: what a model generated for a chat, stored by the hash of everything that
decided it, so repeated prompts in a dataset and reruns of a job reuse it.

A key is the sha256 of (the prompt, the model and its revision, the system prompt, the
sampling settings, and the row's seed when sampling: greedy text does not depend on it). An
entry is one small JSON object ``<cache>/<key>.json`` holding the key, the generated text,
whether it ended by itself, and the sha256 of those: an entry is used only when it parses,
answers its key and matches its sha256; anything else is a miss, generated again and
overwritten. Entries are written whole or not at all (``storage.write_bytes``), by every
worker of the stage, wherever the cache is: under the output (``cache/rewrites/``) or at a
shared URI several jobs use. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging

from rendering import storage

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # what an entry's key is made of; a change makes every key new


def rewrite_key(prompt: str, model: str, revision: str | None, system_prompt: str,
                settings: dict, seed: int | None) -> str:
    """The key of a rewrite: ``seed`` is None for greedy decoding (it decides nothing)."""
    canonical = json.dumps({"v": CACHE_VERSION, "prompt": prompt, "model": model,
                            "revision": revision, "system_prompt": system_prompt,
                            "settings": settings, "seed": seed},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _payload_sha256(text: str, ended: bool) -> str:
    return hashlib.sha256(json.dumps([text, ended], ensure_ascii=False)
                          .encode("utf-8", "surrogatepass")).hexdigest()


class RewriteCache:
    """Entries under one URI (a folder on any fsspec storage)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._root = storage.filesystem(uri)

    def _path(self, key: str) -> str:
        return storage.join(self._root, f"{key}.json")

    def get(self, key: str) -> tuple[str, bool] | None:
        """(generated text, whether it ended by itself), or None: absent, unreadable, or not
        the entry of ``key`` (damaged, or written by something else)."""
        try:
            data = storage.with_retries(f"read of rewrite {key[:12]}", self._fs.cat_file,
                                        self._path(key))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss
            logger.warning("rewrite cache: could not read %s (%s); generating it", key[:12], exc)
            return None
        try:
            entry = json.loads(data)
            text, ended = entry["text"], entry["ended"]
            if entry["key"] != key or not isinstance(text, str) or not isinstance(ended, bool) \
                    or entry["sha256"] != _payload_sha256(text, ended):
                raise ValueError("its key or sha256 does not match")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("rewrite cache: entry %s is damaged (%s); generating it again",
                           key[:12], exc)
            return None
        return text, ended

    def put(self, key: str, text: str, ended: bool) -> None:
        """Store an entry; a cache that cannot be written costs only a later generation."""
        body = json.dumps({"key": key, "text": text, "ended": ended,
                           "sha256": _payload_sha256(text, ended)}, ensure_ascii=False)
        try:
            storage.with_retries(f"write of rewrite {key[:12]}", storage.write_bytes, self._fs,
                                 self._path(key), body.encode("utf-8", "surrogatepass"))
        except Exception as exc:  # noqa: BLE001
            logger.warning("rewrite cache: could not store %s (%s)", key[:12], exc)
