"""A supervised pool of render actors: one pinned GPU (or a share of one, or a few CPUs) and
one pipeline each. A multi-stage job has one pool per stage.

The pool carries shards; it does not decide what they hold. It keeps each actor's queue short
(the driver decides how many shards an actor may hold), notices dead actors (their calls raise)
and hung ones (their oldest shard outlives ``shard_timeout_s``), kills and replaces them, and
hands their unfinished shards back as lost so the driver can retry them elsewhere. It grows and
shrinks when the driver moves workers between stages: a retired worker first finishes the
shards it holds.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.protocol import ShardOutcome
from rendering.contract import Task, WorkerSpec
from rendering.worker import ShardRenderer

logger = logging.getLogger(__name__)


class _PlacedRenderer(ShardRenderer):
    """A ShardRenderer that can say where Ray placed it, so placement can be logged and checked."""

    def placement(self) -> dict:
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(),
                "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}


# The one place the plain worker class becomes an actor. Two concurrent calls let the next shard
# render while the previous one finishes encoding and uploading; the worker's render lock keeps
# the GPU to one batch at a time. Ray must not restart it behind our back: the pool replaces it.
_ACTOR_OPTIONS = dict(max_restarts=0, max_task_retries=0, max_concurrency=2)
RenderActor = ray.remote(**_ACTOR_OPTIONS)(_PlacedRenderer)


class PoolError(RuntimeError):
    """The pool cannot make progress (no worker could start, or too many died)."""


@dataclass
class _Worker:
    index: int
    actor: Any
    inflight: deque = field(default_factory=deque)  # (ref, token)
    busy_since: float = 0.0  # when the oldest in-flight shard became the oldest
    # A replacement's pending setup() call. Until it returns the worker gets no shards while
    # another can take them: after a node is lost, a replacement may wait for a GPU that never
    # comes back, and shards queued on it would only time out.
    setup_ref: Any = None
    retiring: bool = False  # takes no new shards; stopped once those it holds are done


class WorkerPool:
    def __init__(self, spec: WorkerSpec, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                 shard_timeout_s: float, setup_timeout_s: float = 1800.0,
                 worker_class: type | None = None, gpus_per_worker: float = 1.0):
        self.spec = spec
        # A stand-in for ShardRenderer with the same methods (the benchmarks' do-nothing one).
        self._actor_class = (RenderActor if worker_class is None
                             else ray.remote(**_ACTOR_OPTIONS)(worker_class))
        self.num_workers = num_workers
        self.shard_timeout_s = shard_timeout_s
        self.setup_timeout_s = setup_timeout_s
        self._options = dict(num_gpus=gpus_per_worker if use_gpu else 0, num_cpus=cpus_per_worker,
                             scheduling_strategy="SPREAD")
        self._workers: list[_Worker] = []
        self._next_index = 0
        self.replaced = 0
        # A worker that dies on start-up every time would be replaced forever; stop instead.
        self._max_replacements = 3 * num_workers + 3

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> list[dict]:
        """Start every worker and load the model on all of them in parallel."""
        return start_pools([self])[0]

    def launch(self) -> list:
        """Create the workers and ask each to load the model; the setup calls' refs."""
        self._workers = [self._spawn() for _ in range(self.num_workers)]
        return [w.actor.setup.remote() for w in self._workers]

    def resize(self, num_workers: int) -> None:
        """Grow to ``num_workers`` (new workers load the model, then take shards) or shrink
        (the least busy workers retire: they finish what they hold, then stop)."""
        self.num_workers = num_workers
        active = [w for w in self._workers if not w.retiring]
        for _ in range(num_workers - len(active)):
            fresh = self._spawn()
            fresh.setup_ref = fresh.actor.setup.remote()
            self._workers.append(fresh)
        for worker in sorted(active, key=lambda w: len(w.inflight))[:max(0, len(active) - num_workers)]:
            worker.retiring = True
        self._stop_drained()

    def placements(self) -> list[dict]:
        """Where each worker runs: its node id and the GPU ids Ray pinned it to."""
        return ray.get([w.actor.placement.remote() for w in self._workers])

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker.actor, no_restart=True)
        self._workers = []

    # --- work ------------------------------------------------------------------------------
    def submit(self, token: Any, tasks: list[Task], max_per_worker: int) -> bool:
        """Queue a shard on the least loaded worker; False when every worker is full."""
        serving = [w for w in self._workers if not w.retiring]
        ready = [w for w in serving if w.setup_ref is None] or serving
        worker = min(ready, key=lambda w: len(w.inflight))
        if len(worker.inflight) >= max_per_worker:
            return False
        if not worker.inflight:
            worker.busy_since = time.monotonic()
        worker.inflight.append((worker.actor.render_shard.remote(tasks), token))
        return True

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        """Block until a shard finishes, a worker dies or hangs, or ``timeout_s`` passes."""
        refs = {ref: w for w in self._workers for ref, _ in w.inflight}
        if not refs:
            return []
        setups = {w.setup_ref: w for w in self._workers if w.setup_ref is not None}
        until_deadline = min(w.busy_since + self.shard_timeout_s - time.monotonic()
                             for w in self._workers if w.inflight)
        ready, _ = ray.wait(list(refs) + list(setups), num_returns=1,
                            timeout=max(0.0, min(timeout_s, until_deadline)))
        outcomes: list[ShardOutcome] = []
        for ref in ready:
            if ref in setups:
                outcomes += self._settle_setup(setups[ref], ref)
                continue
            worker = refs[ref]
            if worker not in self._workers:
                continue  # already replaced while handling an earlier ref
            token = self._pop(worker, ref)
            try:
                outcomes.append(ShardOutcome(token, ray.get(ref)))
            except RayActorError as exc:
                outcomes.append(ShardOutcome(token, None, f"worker died: {_first_line(exc)}"))
                outcomes += self._replace(worker, "died")
            except Exception as exc:  # noqa: BLE001 - a broken call loses the shard, not the job
                outcomes.append(ShardOutcome(token, None, f"worker error: {_first_line(exc)}"))
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.inflight and now - worker.busy_since > self.shard_timeout_s:
                logger.warning("worker %d has been on one shard for over %g s: killing it",
                               worker.index, self.shard_timeout_s)
                outcomes += self._replace(worker, f"hung: no result within {self.shard_timeout_s:g} s")
        self._stop_drained()
        return outcomes

    # --- internals -------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        actor = self._actor_class.options(**self._options, name=None).remote(self.spec)
        worker = _Worker(self._next_index, actor)
        self._next_index += 1
        return worker

    def _pop(self, worker: _Worker, ref) -> Any:
        for i, (candidate, token) in enumerate(worker.inflight):
            if candidate == ref:
                del worker.inflight[i]
                if i == 0:  # the next shard is now the oldest; a later one's end says nothing
                    worker.busy_since = time.monotonic()
                return token
        raise KeyError(ref)

    def _replace(self, worker: _Worker, reason: str) -> list[ShardOutcome]:
        """Kill ``worker``, start a fresh one in its place, and report its shards as lost."""
        self.replaced += 1
        if self.replaced > self._max_replacements:
            raise PoolError(f"{self.replaced} workers were lost (last: {reason}); giving up. "
                            "Check the worker logs (ray logs) and the cluster's health")
        ray.kill(worker.actor, no_restart=True)
        lost = [ShardOutcome(token, None, f"worker {reason}") for _, token in worker.inflight]
        position = self._workers.index(worker)
        if worker.retiring:  # it was leaving anyway: no one takes its place
            del self._workers[position]
            return lost
        fresh = self._spawn()
        fresh.setup_ref = fresh.actor.setup.remote()  # load at once, placed wherever a GPU is free
        self._workers[position] = fresh
        logger.warning("worker %d %s; started worker %d, %d shard(s) to retry",
                       worker.index, reason, fresh.index, len(lost))
        return lost

    def _stop_drained(self) -> None:
        """Stop the retiring workers that hold no shard any more."""
        for worker in [w for w in self._workers if w.retiring and not w.inflight]:
            ray.kill(worker.actor, no_restart=True)
            self._workers.remove(worker)

    def _settle_setup(self, worker: _Worker, ref) -> list[ShardOutcome]:
        """A replacement finished loading: it may take shards now, or it failed and is replaced."""
        if worker not in self._workers:
            return []
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot load is replaced
            return self._replace(worker, f"failed to load the model: {_first_line(exc)}")
        worker.setup_ref = None
        return []


def start_pools(pools: list[WorkerPool]) -> list[list[dict]]:
    """Start the workers of every pool (every stage) and load their models, all at once, so
    the stages' loads overlap. On failure every worker is killed: the caller never holds a pool
    that did not start, so nothing else would free their GPUs."""
    refs = [pool.launch() for pool in pools]
    timeout_s = max(pool.setup_timeout_s for pool in pools)
    try:
        infos = ray.get([ref for group in refs for ref in group], timeout=timeout_s)
    except BaseException as exc:
        for pool in pools:
            pool.shutdown()
        raise _start_error(exc, sum(p.num_workers for p in pools), timeout_s) from None
    out, at = [], 0
    for group in refs:
        out.append(infos[at:at + len(group)])
        at += len(group)
    return out


def _start_error(exc: BaseException, num_workers: int, timeout_s: float) -> BaseException:
    """The PoolError that says why workers did not start, or ``exc`` itself if unexpected."""
    if isinstance(exc, GetTimeoutError):
        return PoolError(f"workers did not load the model within {timeout_s:g} s (are there "
                         f"enough free GPUs/CPUs for {num_workers} workers?)")
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) else exc
        return PoolError(f"the model could not be loaded: {type(cause).__name__}: {cause}")
    if isinstance(exc, RayActorError):
        return PoolError(f"a worker died while loading the model ({_first_line(exc)}): "
                         "check the cluster's health, then rerun to resume")
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
