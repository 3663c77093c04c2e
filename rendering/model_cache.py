"""The node-local model cache: a model is fetched once per node, not once per worker.

Every worker on a node resolves ``model.path`` through here before diffusers loads it:

- an fsspec URL (``s3://bucket/models/wan-1.3b``, ``gs://...``, ``file:///nfs/...``) names a
  diffusers folder; it is copied once into ``$HF_HOME/reelfarm/models/`` and loaded from there,
  so an air-gapped cluster needs only its object store;
- a hub id goes through huggingface_hub's own cache (``$HF_HOME/hub``); once cached it is used
  without asking the hub again, and ``HF_HUB_OFFLINE=1`` is honoured;
- a plain local folder is used as it is.

Pipelines (``resolve``) and scoring models alike go through ``resolve_folder``: they differ only
in the file that makes a folder a model and in how the hub's files are downloaded.

Workers on one node take a file lock per model, so one copies or downloads while the others
wait, then all load the same files. A copy is made in a temp folder and renamed into place:
a cached model is complete or absent. Remote model folders are treated as immutable: publish
new weights under a new path (the cache is keyed by URL).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Callable

from rendering import storage
from rendering.contract import ModelSpec

logger = logging.getLogger(__name__)

_CACHE_SUBDIR = os.path.join("reelfarm", "models")
_LOCK_SUBDIR = os.path.join("reelfarm", "locks")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ModelCacheError(RuntimeError):
    """The model cannot be made available on this node; the message says why and what to do."""


def is_url(path: str) -> bool:
    """An fsspec URL (``scheme://...``), as opposed to a local folder or a hub id."""
    return "://" in path


def hf_home() -> str:
    """``$HF_HOME`` as huggingface_hub reads it (default ``~/.cache/huggingface``), read now."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                           "huggingface")
    return os.path.expanduser(os.path.expandvars(os.environ.get("HF_HOME", default)))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def resolve(spec: ModelSpec) -> str:
    """What ``DiffusionPipeline.from_pretrained`` should load: a local folder, fetched if need be."""
    return resolve_folder(spec.path, spec.revision, functools.partial(_download_pipeline, spec))


def resolve_folder(path: str, revision: str | None, download: Callable[[bool], str],
                   marker: str = "model_index.json", key: str = "model.path") -> str:
    """The local folder of the model at ``path``: a local folder as it is, a URL copied once into
    this node's cache (``marker`` names the file a model folder holds), a hub id through
    huggingface_hub's cache by ``download`` (see ``fetch_hub``); ``key`` names the setting."""
    if is_url(path):
        return fetch_url(path, marker, key)
    if os.path.isdir(path):
        return path
    return fetch_hub(path, revision, download, key)


def cached_path(url: str) -> str:
    """Where ``url`` lives in this node's cache: its last name plus a digest of the whole URL."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    name = _UNSAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1]) or "model"
    return os.path.join(hf_home(), _CACHE_SUBDIR, f"{name}-{digest}")


def fetch_url(url: str, marker: str = "model_index.json", key: str = "model.path") -> str:
    """Copy the model folder at ``url`` into this node's cache once; return the local folder.

    ``marker`` is the file that makes it a model folder: a diffusers pipeline's model_index.json,
    a transformers model's config.json; ``key`` names the setting in messages."""
    target = cached_path(url)
    if os.path.isdir(target):
        return target
    with node_lock(os.path.basename(target)):
        if os.path.isdir(target):  # another worker on this node copied it while we waited
            return target
        started = time.monotonic()
        count, size = _copy_tree(url, target, marker, key)
    logger.info("copied %s (%d files, %.1f MB) to %s in %.1f s", url, count, size / 1e6, target,
                time.monotonic() - started)
    return target


def fetch_hub(repo: str, revision: str | None, download: Callable[[bool], str],
              key: str = "model.path") -> str:
    """The hub model's folder in huggingface_hub's cache, downloaded once per node if need be.

    ``download(local_files_only)`` fetches the files its library loads and returns their folder:
    from the cache alone first, then (unless HF_HUB_OFFLINE is set) from the hub.
    """
    with node_lock(hub_lock_name(repo, revision)):
        try:
            return download(True)
        except (OSError, ValueError, ModelCacheError) as exc:  # not (fully) cached on this node yet
            if hub_offline():
                raise ModelCacheError(
                    f"model {repo!r} is not in this node's hub cache ({hf_home()}/hub) and "
                    f"HF_HUB_OFFLINE is set: pre-fetch it into the cache, or copy the folder to "
                    f"object storage and set {key} to its URL") from exc
        logger.info("downloading %s from the hub into %s", repo, hf_home())
        return download(False)


def _download_pipeline(spec: ModelSpec, local_files_only: bool) -> str:
    """A diffusers pipeline's files (safetensors only, no remote code) in the hub cache."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(spec.path, local_files_only=local_files_only,
                                          revision=spec.revision, variant=spec.variant,
                                          use_safetensors=True, trust_remote_code=False)
    except OSError as exc:  # the hub's errors, and diffusers' wrapping of them
        if local_files_only:
            raise  # not cached yet: fetch_hub decides what comes next
        raise ModelCacheError(_hub_failure(spec, exc)) from exc


def transformers_snapshot(name: str, repo: str, revision: str | None, patterns: list[str],
                          local_files_only: bool) -> str:
    """A transformers model's files (``patterns``) in the hub cache, checked by
    ``transformers_folder`` (the node-local fetch around it is ``fetch_hub``'s)."""
    from huggingface_hub import snapshot_download

    return transformers_folder(name, snapshot_download(
        repo, revision=revision, allow_patterns=patterns, local_files_only=local_files_only))


def transformers_folder(name: str, folder: str) -> str:
    """``folder`` if it holds a transformers config and safetensors weights (all reelfarm
    loads); ``name`` says whose (``scoring model 'x'``) in the refusal."""
    names = set(os.listdir(folder))
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ModelCacheError(f"{name} has no config.json or no safetensors weights (reelfarm "
                              f"loads safetensors only)")
    return folder


def _hub_failure(spec: ModelSpec, exc: OSError) -> str:
    """Why a hub model could not be fetched and what to do, in one line. diffusers' own message
    ends "see the stacktrace above", and the command line shows none without --debug: its cause
    (the hub's answer) decides the message here."""
    from huggingface_hub import errors

    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    name = f"model {spec.path!r}"
    if isinstance(cause, errors.GatedRepoError):
        reason = (f"{name} is gated on the hub: accept its terms there, then set HF_TOKEN to a "
                  f"token of that account")
    elif isinstance(cause, errors.RevisionNotFoundError):
        reason = f"{name} has no revision {spec.revision!r} on the hub: check model.revision"
    elif isinstance(cause, errors.RepositoryNotFoundError):
        reason = (f"{name} was not found on the hub: check model.path (a hub id is "
                  f"'organisation/name'), or set HF_TOKEN if it is private or gated")
    elif isinstance(cause, errors.HfHubHTTPError):
        reason = f"the hub refused {name} ({_first_line(cause)}): check model.path and HF_TOKEN"
    elif cause is exc:
        reason = f"{name} could not be fetched from the hub ({_first_line(exc)})"
    else:  # no answer: the network, a proxy, HF_ENDPOINT
        reason = (f"{name} could not be fetched: the hub did not answer ({type(cause).__name__}: "
                  f"{_first_line(cause)}): check the network (and HF_ENDPOINT), or pre-fetch the "
                  f"model into the hub cache")
    return f"{reason}; --debug shows the traceback"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def hub_lock_name(repo: str, revision: str | None) -> str:
    return _UNSAFE.sub("_", f"hub-{repo}-{revision or 'main'}")


def _copy_tree(url: str, target: str, marker: str, key: str) -> tuple[int, int]:
    """Copy every file under ``url`` into a temp folder beside ``target``, then rename it in."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ModelCacheError(f"{key} {url} is not a folder: point it at a model folder (the "
                              f"one holding {marker})")
    files = [p for p in fs.find(root) if not fs.isdir(p)]
    if not any(p[len(root) + 1:] == marker for p in files):
        raise ModelCacheError(f"{key} {url} holds no {marker}: point it at a model folder (the "
                              f"one holding {marker})")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{storage.TEMP_MARKER}", dir=parent)
    try:
        size = 0
        for path in files:
            relative = path[len(root) + 1:]
            if not relative or ".." in relative.split("/"):
                raise ModelCacheError(f"{key} {url}: refusing to copy odd object name {path!r}")
            local = os.path.join(temp, *relative.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(path, local)
            size += os.path.getsize(local)
        os.rename(temp, target)
    finally:
        if os.path.exists(temp):
            shutil.rmtree(temp, ignore_errors=True)
    return len(files), size


@contextlib.contextmanager
def node_lock(name: str):
    """An exclusive lock shared by every process on this node (the cache is node-local)."""
    directory = os.path.join(hf_home(), _LOCK_SUBDIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
