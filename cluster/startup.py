"""Starting pools: every stage's workers at once, waiting for capacity and for the models to
load, and one clear error when they cannot start."""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.pool import PoolError, WorkerPool, first_line

logger = logging.getLogger(__name__)

WAITING_LOG_EVERY_S = 30.0


def start_pools(pools: list[WorkerPool]) -> list[list[dict]]:
    """Start the workers of every pool (every stage) and load their models, all at once, so
    the stages' loads overlap; return once each pool has loaded ``num_workers`` (an elastic
    pool's minimum; the rest take shards as they load). While no worker of a pool can be placed (no GPU node yet: an
    autoscaler is bringing one up), say so every ``WAITING_LOG_EVERY_S``, up to the pools'
    ``capacity_timeout_s``. On failure every worker is killed: the caller never holds a pool
    that did not start, so nothing else would free their GPUs."""
    try:
        return _wait_for_one_each(pools, [pool.launch() for pool in pools])
    except BaseException as exc:
        for pool in pools:
            pool.shutdown()
        raise _start_error(exc) from None


def _wait_for_one_each(pools: list[WorkerPool], launched: list[list]) -> list[list[dict]]:
    started = time.monotonic()
    capacity_s = max(p.capacity_timeout_s for p in pools)
    loaded: list[list[dict]] = [[] for _ in pools]
    pending = {w.setup_ref: (i, w) for i, group in enumerate(launched) for w in group}
    # An actor answers placement() as soon as Ray has placed it, while its model loads.
    unplaced = {w.actor.placement.remote(): i for i, group in enumerate(launched) for w in group}
    placed = [0] * len(pools)
    next_log = started + 2.0  # the first word soon, then every WAITING_LOG_EVERY_S

    def enough() -> bool:  # every pool has its num_workers (an elastic one: its minimum)
        return all(len(got) >= pool.num_workers for got, pool in zip(loaded, pools))

    while pending and not enough():
        ready, _ = ray.wait([*pending, *unplaced], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in unplaced:
                placed[unplaced.pop(ref)] += 1
                continue
            i, worker = pending.pop(ref)
            info = ray.get(ref)  # a load that fails raises: the model cannot be loaded
            pools[i].took_loaded(worker, info)
            loaded[i].append(info)
        waited = time.monotonic() - started
        if not all(placed) and waited > capacity_s:
            raise GetTimeoutError(f"no worker could be placed within cluster.capacity_timeout_s "
                                  f"= {capacity_s:g} s")
        if waited > capacity_s + max(p.setup_timeout_s for p in pools):
            raise GetTimeoutError(f"workers did not load the model within {waited:.0f} s")
        if time.monotonic() > next_log and not enough():
            next_log = time.monotonic() + WAITING_LOG_EVERY_S
            workers = sum(len(group) for group in launched)
            unit = "GPU" if any(p.unit == "GPU" for p in pools) else "CPU"
            logger.info("waiting for %s capacity: %d of %d workers placed and loaded, asking "
                        "the autoscaler for %d", unit, sum(map(len, loaded)), workers, workers)
    # Those loaded in the meantime take shards at once; the rest settle in wait().
    for ref, (i, worker) in list(pending.items()):
        if ray.wait([ref], timeout=0)[0]:
            try:
                info = ray.get(ref)
            except Exception:  # noqa: BLE001 - settled (and replaced) by the pool later
                continue
            pools[i].took_loaded(worker, info)
            loaded[i].append(info)
    return loaded


def _start_error(exc: BaseException) -> BaseException:
    """The PoolError that says why workers did not start, or ``exc`` itself if unexpected."""
    if isinstance(exc, GetTimeoutError):
        return PoolError(f"{exc}: are there enough free GPUs/CPUs for a worker, or can the "
                         f"cluster's autoscaler add nodes?")
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) else exc
        return PoolError(f"the model could not be loaded: {type(cause).__name__}: {cause}")
    if isinstance(exc, RayActorError):
        return PoolError(f"a worker died while loading the model ({first_line(exc)}): "
                         "check the cluster's health, then rerun to resume")
    return exc
