"""The Ray worker pool grows and shrinks, as rebalancing between stages asks, without losing a
shard: a retired worker finishes what it holds, then stops; a new one loads, then takes work."""

from __future__ import annotations

import time

from helpers import prompts, tiny_config, wait_for, write_prompts

from cluster.pool import WorkerPool
from jobs.config import validate
from jobs.input.dataset import open_dataset
from jobs.run.workers import worker_spec
from jobs.store.hashset import HashSet
from jobs.input.plan import PlanCounts, plan_rows


def _run(pool: WorkerPool, shards: dict[int, list], submitted: set[int] = frozenset(),
         timeout_s: float = 120) -> dict:
    """Submit ``shards`` (token: tasks) as the pool takes them, as the scheduler does, and
    collect their results and those of the shards ``submitted`` before."""
    pending, results = dict(shards), {}
    expected = set(shards) | set(submitted)
    deadline = time.monotonic() + timeout_s
    while set(results) != expected:
        assert time.monotonic() < deadline, f"shards not back: {expected - set(results)}"
        for token in list(pending):
            if pool.submit(token, pending[token], 2):
                del pending[token]
        for outcome in pool.wait(1.0):
            results[outcome.token] = outcome.results
    return results


def test_a_pool_shrinks_and_grows_without_losing_a_shard(tmp_path, ray_local):
    src = write_prompts(tmp_path / "prompts.parquet", prompts(12))
    cfg = validate(tiny_config(src, str(tmp_path / "out"), render={"batch_size": 1}))
    tasks = [p.outcome for p in plan_rows(open_dataset(src, []), cfg, HashSet(), PlanCounts())]
    # Half a CPU each: three workers fit on this two-CPU cluster.
    pool = WorkerPool(worker_spec(cfg), 2, False, 0.5, shard_timeout_s=120)
    try:
        pool.start()
        assert all(pool.submit(i, tasks[i:i + 1], 2) for i in range(4))
        assert not pool.submit(99, tasks[:1], 2)  # both workers hold two shards
        pool.resize(1)  # one retires, with its two shards still to finish
        results = _run(pool, {i: tasks[i:i + 1] for i in range(4, 6)}, submitted={0, 1, 2, 3})
        assert len(pool.placements()) == 1 and pool.replaced == 0

        pool.resize(3)  # two new workers start and load the model
        results.update(_run(pool, {i: tasks[i:i + 1] for i in range(6, 12)}))
        assert sorted(results) == list(range(12))
        assert all(r is not None and r[0].ok for r in results.values())
        wait_for(lambda: pool.wait(0.5) == [] and len(pool.placements()) == 3, 120,
                 "the two new workers to load")
        assert pool.replaced == 0
    finally:
        pool.shutdown()
