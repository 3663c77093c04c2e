"""A supervised, elastic pool of render actors: one pinned GPU (or a share of one, or a few CPUs)
and one pipeline each. A multi-stage job has one pool per stage.

The pool carries shards; it does not decide what they hold. It keeps each actor's queue short
(the driver decides how many shards an actor may hold), notices dead actors (their calls raise)
and hung ones (their oldest shard outlives ``shard_timeout_s``), kills and replaces them, and
hands their unfinished shards back as lost so the driver can retry them elsewhere.

It follows its cluster: it holds ``num_workers`` at least and grows up to ``max_workers`` while
the driver has work for more (``demand``), placing workers where resources appeared and asking
Ray's autoscaler for the rest. Draining nodes get no new shards, and shards that would miss the
drain's deadline come back at once. A worker lost with its node is a loss, not a failure (no
replacement budget); workers failing to load one after another on healthy nodes stop the pool.
At the tail idle workers first take backup copies of late shards (a slow GPU no longer holds
up a job's end), then retire; ``resize`` moves workers between stages.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from cluster import capacity
from cluster.actor import ACTOR_OPTIONS, RenderActor
from cluster.protocol import ShardOutcome
from rendering import storage
from rendering.contract import Task, WorkerSpec

logger = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """The pool cannot make progress (no worker could be placed, or none can load its model)."""


LOOK_EVERY_S = 2.0  # how often the pool looks at the cluster: capacity, draining nodes
LOAD_FAILURES_IN_A_ROW = 3  # workers failing to load, one after another, on healthy nodes
# At the tail, a shard held this many times as long as a shard typically takes gets a backup copy
# on an idle worker (MapReduce's backup tasks): the first copy back is delivered.
BACKUP_AFTER = 1.5
STOP_WAIT_S = 30.0  # waiting for a stopped copy's worker to be gone before its twin commits


@dataclass
class _Worker:
    index: int
    actor: Any
    inflight: deque = field(default_factory=deque)  # (ref, token)
    busy_since: float = 0.0  # when the oldest in-flight shard became the oldest
    # Its pending setup() call: until it returns it gets no shards while another can take them
    # (a replacement may wait for a GPU that never comes back; shards queued there time out).
    setup_ref: Any = None
    retiring: bool = False  # takes no new shards; stopped once those it holds are done
    placement: dict = field(default_factory=dict)  # node_id, ip, gpu_ids: known once it loaded
    placed: bool = False  # Ray has created it on a node (it may still be loading its model)
    draining: bool = False  # its node is being drained: retiring, and watched for the deadline

    @property
    def node_id(self) -> str | None:
        return self.placement.get("node_id")


class WorkerPool:
    def __init__(self, spec: WorkerSpec, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                 shard_timeout_s: float, setup_timeout_s: float = 1800.0,
                 worker_class: type | None = None, gpus_per_worker: float = 1.0,
                 max_workers: float | None = None, capacity_timeout_s: float = 1800.0,
                 backups: bool = True):
        self.spec = spec
        # A stand-in for ShardRenderer with the same methods (the benchmarks' do-nothing one).
        self._actor_class = (RenderActor if worker_class is None
                             else ray.remote(**ACTOR_OPTIONS)(worker_class))
        self.num_workers = num_workers  # held at least, placed or waiting for capacity
        # Grown to while there is work (math.inf: no limit); None: a fixed pool.
        self.max_workers = num_workers if max_workers is None else max_workers
        self._elastic = self.max_workers > num_workers
        self.shard_timeout_s = shard_timeout_s
        self.setup_timeout_s = setup_timeout_s  # a placed worker's model load, at most
        self.capacity_timeout_s = capacity_timeout_s  # waiting for the first worker's place
        self._bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
        self._options = dict(num_gpus=gpus_per_worker if use_gpu else 0, num_cpus=cpus_per_worker,
                             scheduling_strategy="SPREAD")
        self._workers: list[_Worker] = []
        self._next_index = 0
        self._wanted = num_workers  # workers the driver's remaining work could keep busy
        self._next_look = 0.0
        self._load_failures = 0  # workers that failed to load, in a row
        self._shard_s: float | None = None  # how long a shard takes, smoothed
        self.backups = backups  # idle workers take copies of late shards at the tail
        self._tasks: dict[Any, list[Task]] = {}  # token -> tasks, in flight (for backup copies)
        self._backups: dict[Any, int] = {}  # token -> the worker holding its backup copy
        # Called with each worker's setup info once it has loaded (the driver checks its probe).
        self.on_loaded: Callable[[dict], None] | None = None
        self.replaced = 0
        # joined (placed after the start), lost_with_node, drained, retired_idle (at the tail),
        # backups (copies of late shards), backups_first (a backup copy came back first)
        self.events: Counter = Counter()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> list[dict]:
        """Start the workers and load the model; the loaded ones' setup info."""
        from cluster.startup import start_pools

        return start_pools([self])[0]

    def launch(self) -> list[_Worker]:
        """Create the first workers (what the cluster can hold now, ``num_workers`` at least,
        ``max_workers`` at most) and ask each to load the model (``setup_ref``)."""
        first = self.num_workers
        if self._elastic:
            first = int(min(self.max_workers, max(first, self._fits(ray.cluster_resources()))))
        self._workers = [self._spawn() for _ in range(first)]
        for worker in self._workers:
            worker.setup_ref = worker.actor.setup.remote()
        self._ask_autoscaler(first)
        return list(self._workers)

    def resize(self, num_workers: int) -> None:
        """Grow to ``num_workers`` (new workers load the model, then take shards) or shrink
        (the least busy workers retire: they finish what they hold, then stop)."""
        self.num_workers = num_workers
        if not self._elastic or self.max_workers < num_workers:
            self.max_workers = num_workers
        active = self._serving()
        for _ in range(num_workers - len(active)):
            self._add()
        for worker in sorted(active, key=lambda w: len(w.inflight))[:max(0, len(active) - num_workers)]:
            worker.retiring = True
        self._stop_drained()

    def demand(self, workers: int) -> None:
        """How many workers the driver's remaining work could keep busy: the pool grows toward
        it (up to ``max_workers``) and asks the autoscaler for it; 0 at the tail, where idle
        workers retire."""
        self._wanted = workers

    def placements(self) -> list[dict]:
        """Where each loaded worker runs: its node id and the GPU ids Ray pinned it to."""
        return [dict(w.placement) for w in self._workers if w.setup_ref is None]

    def loaded(self) -> int:
        return sum(w.setup_ref is None for w in self._workers)

    def states(self) -> Counter:
        """Workers by state; whether a loading one is placed yet is asked of Ray's GCS."""
        for worker in (w for w in self._workers if w.setup_ref is not None and not w.placed):
            worker.placed = capacity.actor_placed(worker.actor)
        return Counter(("loading" if w.placed else "pending") if w.setup_ref is not None else
                       "retiring" if w.retiring else "busy" if w.inflight else "ready"
                       for w in self._workers)

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker.actor, no_restart=True)
        self._workers = []
        capacity.request(id(self), 0, {})

    # --- work ------------------------------------------------------------------------------
    def submit(self, token: Any, tasks: list[Task], max_per_worker: int) -> bool:
        """Queue a shard on the least loaded worker; False when every worker is full."""
        serving = self._serving()
        if not serving:  # all retired at the tail, and a retry came back
            serving = [self._add()]
        ready = [w for w in serving if w.setup_ref is None] or serving
        worker = min(ready, key=lambda w: len(w.inflight))
        if len(worker.inflight) >= max_per_worker:
            return False
        self._tasks[token] = tasks
        self._hand(worker, token)
        return True

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        """Block until a shard finishes, a worker dies or hangs, or ``timeout_s`` passes."""
        outcomes = self._look()
        refs = {ref: w for w in self._workers for ref, _ in w.inflight}
        setups = {w.setup_ref: w for w in self._workers if w.setup_ref is not None}
        if not refs:  # nothing to wait for; workers that have loaded meanwhile may take shards
            for ref in ray.wait(list(setups), num_returns=len(setups), timeout=0)[0]:
                outcomes += self._settle_setup(setups[ref], ref)
            return outcomes
        until_deadline = min(w.busy_since + self.shard_timeout_s - time.monotonic()
                             for w in self._workers if w.inflight)
        ready, _ = ray.wait(list(refs) + list(setups), num_returns=1,
                            timeout=max(0.0, min(timeout_s, until_deadline, LOOK_EVERY_S)))
        for ref in ready:
            if ref in setups:
                outcomes += self._settle_setup(setups[ref], ref)
                continue
            worker = refs[ref]
            if worker not in self._workers:
                continue  # already replaced while handling an earlier ref
            token, started = self._pop(worker, ref)
            try:
                outcomes += self._one_copy(worker, ShardOutcome(token, ray.get(ref),
                                                                placement=worker.placement))
                self._timed(time.monotonic() - started)
            except RayActorError as exc:
                with_node = self._lost_with_node(worker, exc)
                why = "lost with its node" if with_node else f"died: {first_line(exc)}"
                outcomes += self._one_copy(worker, ShardOutcome(token, None, f"worker {why}",
                                                                lost_with_node=with_node))
                outcomes += self._replace(worker, "lost with its node" if with_node else "died",
                                          with_node)
            except Exception as exc:  # noqa: BLE001 - a broken call loses the shard, not the job
                outcomes += self._one_copy(worker, ShardOutcome(
                    token, None, f"worker error: {first_line(exc)}"))
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.inflight and now - worker.busy_since > self.shard_timeout_s:
                logger.warning("worker %d has been on one shard for over %g s: killing it",
                               worker.index, self.shard_timeout_s)
                outcomes += self._replace(worker, f"hung: no result within {self.shard_timeout_s:g} s")
        self._stop_drained()
        return outcomes

    # --- following the cluster -------------------------------------------------------------
    def _look(self) -> list[ShardOutcome]:
        """Every ``LOOK_EVERY_S``: hand back what draining nodes cannot finish, place workers
        where capacity appeared while work waits, retire idle ones at the tail, and tell the
        autoscaler what the pool could use."""
        now = time.monotonic()
        if now < self._next_look:
            return []
        self._next_look = now + LOOK_EVERY_S
        outcomes = self._drain(capacity.draining_nodes())
        serving = self._serving()
        wanted = int(min(self.max_workers, max(self._wanted, self.num_workers)))
        if self._wanted and len(serving) < wanted and not any(w.setup_ref for w in serving):
            more = min(wanted - len(serving), self._fits(ray.available_resources()))
            if more > 0:
                logger.info("capacity for %d more worker(s) appeared: placing them (%d in all)",
                            more, len(serving) + more)
                for _ in range(more):
                    self._add()
                self.events["joined"] += more
        if not self._wanted:
            self._back_up(serving)
            idle = [w for w in serving if not w.inflight and w.setup_ref is None]
            # Idle workers stay for the shards in flight without a copy (each may need a backup);
            # one stays anyway, for a retry that may come back.
            tokens = {token for w in self._workers for _, token in w.inflight}
            keep = len(tokens - set(self._backups)) if self.backups else 0
            for worker in idle[keep:][:len(serving) - 1]:
                worker.retiring = True
                self.events["retired_idle"] += 1
            self._stop_drained()
        self._ask_autoscaler(wanted if self._wanted else 0)
        return outcomes

    def _drain(self, draining: dict[str, float]) -> list[ShardOutcome]:
        """Workers on draining nodes take no new shards; those whose shards would not finish
        before the node's deadline (seconds since the epoch; 0: none) hand them back now."""
        outcomes = []
        for worker in list(self._workers):
            if worker.node_id not in draining:
                continue
            if not worker.draining:
                logger.warning("worker %d: its node is being drained; it takes no new shards",
                               worker.index)
                worker.draining = worker.retiring = True
            deadline = draining[worker.node_id]
            needed = (self._shard_s or self.shard_timeout_s) * len(worker.inflight)
            if deadline and worker.inflight and time.time() + needed > deadline:
                self.events["drained"] += 1
                outcomes += self._replace(worker, "drained before its deadline", True)
        return outcomes

    def _back_up(self, serving: list[_Worker]) -> None:
        """Give idle workers a backup copy of the shards held longest, once a shard is late
        (``BACKUP_AFTER`` typical shard times): renders are deterministic and the commit is
        idempotent, and only the first copy back reaches the scheduler."""
        if not self.backups or self._shard_s is None:
            return
        now = time.monotonic()
        idle = [w for w in serving if not w.inflight and w.setup_ref is None]
        late = sorted((w for w in self._workers if w.inflight
                       and w.inflight[0][1] not in self._backups
                       and now - w.busy_since > BACKUP_AFTER * self._shard_s),
                      key=lambda w: w.busy_since)
        for spare, slow in zip(idle, late):
            token = slow.inflight[0][1]
            self._hand(spare, token)
            self._backups[token] = spare.index
            self.events["backups"] += 1
            logger.info("worker %d takes a backup copy of the shard worker %d has held for "
                        "%.0f s", spare.index, slow.index, now - slow.busy_since)

    def _one_copy(self, worker: _Worker, outcome: ShardOutcome) -> list[ShardOutcome]:
        """What the scheduler hears of a shard: a backed-up shard's first result, delivered
        once its other copy is stopped; nothing of a copy lost while the other goes on."""
        token = outcome.token
        if token in self._backups:
            backup = self._backups.pop(token)
            if outcome.results is None:
                return []  # the other copy goes on alone
            self.events["backups_first"] += worker.index == backup
            return self._stop_other_copy(worker, outcome)
        self._tasks.pop(token, None)
        return [outcome]

    def _stop_other_copy(self, first: _Worker, outcome: ShardOutcome) -> list[ShardOutcome]:
        """Stop the worker holding the other copy of ``outcome``'s shard (a running actor call
        cannot be interrupted) and wait until it is gone, so nothing it writes can land after
        the commit; then the first copy's artifacts must be as it stored them, else the shard
        is rendered again (two renders on different GPUs may differ in their last bits)."""
        token = outcome.token
        self._tasks.pop(token, None)
        holder = next((w for w in self._workers if any(t == token for _, t in w.inflight)), None)
        if holder is None:  # its worker is gone already, and so is the copy
            return [outcome]
        ref = next(r for r, t in holder.inflight if t == token)
        holder.inflight = deque((r, t) for r, t in holder.inflight if r != ref)
        others = self._replace(holder, f"stopped: worker {first.index} finished its shard's "
                                       f"other copy first", no_fault=True)
        ray.wait([ref], timeout=STOP_WAIT_S)
        fs, root = storage.filesystem(self.spec.output_uri)
        if not storage.stored_intact(fs, root, [a for r in outcome.results for a in r.artifacts]):
            outcome = ShardOutcome(token, None, "its backup copy overwrote what it stored",
                                   lost_with_node=True)
        return [outcome, *others]

    def _fits(self, resources: dict) -> int:
        """How many more workers ``resources`` can hold."""
        return int(min(resources.get(k, 0.0) // v for k, v in self._bundle.items() if v > 0))

    @property
    def unit(self) -> str:
        """What its workers wait for when the cluster has no room: GPU or CPU capacity."""
        return "GPU" if "GPU" in self._bundle else "CPU"

    def _ask_autoscaler(self, workers: int) -> None:
        capacity.request(id(self), workers, self._bundle)

    def _lost_with_node(self, worker: _Worker, exc: BaseException) -> bool:
        """Whether the worker went down with its node (preempted, drained, removed), rather
        than by anything a row did."""
        if getattr(exc, "preempted", False) or worker.draining:
            return True
        if worker.node_id is None:
            return False
        for _ in range(10):  # the node's death reaches the GCS a moment after the actor's
            if not capacity.node_alive(worker.node_id):
                return True
            time.sleep(0.2)
        return False

    # --- internals -------------------------------------------------------------------------
    def _serving(self) -> list[_Worker]:
        return [w for w in self._workers if not w.retiring]

    def _spawn(self) -> _Worker:
        actor = self._actor_class.options(**self._options, name=None).remote(self.spec)
        worker = _Worker(self._next_index, actor)
        self._next_index += 1
        return worker

    def _add(self) -> _Worker:
        """A new worker, loading its model at once wherever Ray places it."""
        worker = self._spawn()
        worker.setup_ref = worker.actor.setup.remote()
        self._workers.append(worker)
        return worker

    def _hand(self, worker: _Worker, token: Any) -> None:
        """Queue the shard ``token`` on ``worker``."""
        if not worker.inflight:
            worker.busy_since = time.monotonic()
        worker.inflight.append((worker.actor.render_shard.remote(self._tasks[token]), token))

    def _pop(self, worker: _Worker, ref) -> tuple[Any, float]:
        """The shard's token, and when it became the worker's oldest."""
        for i, (candidate, token) in enumerate(worker.inflight):
            if candidate == ref:
                started = worker.busy_since
                del worker.inflight[i]
                if i == 0:  # the next shard is now the oldest; a later one's end says nothing
                    worker.busy_since = time.monotonic()
                return token, started
        raise KeyError(ref)

    def _timed(self, seconds: float) -> None:
        self._shard_s = seconds if self._shard_s is None else 0.8 * self._shard_s + 0.2 * seconds

    def _replace(self, worker: _Worker, reason: str, with_node: bool = False,
                 no_fault: bool = False) -> list[ShardOutcome]:
        """Kill ``worker`` and report its shards as lost (``with_node`` or ``no_fault``: no
        attempt of their rows); a worker leaving anyway (retiring, or on a draining node) is not
        replaced, and a lost one only while the pool is under its size (a worker waits for
        capacity; growth places more when it comes)."""
        self.replaced += not no_fault
        if with_node:
            self.events["lost_with_node"] += not worker.draining
        ray.kill(worker.actor, no_restart=True)
        self._workers.remove(worker)
        lost = [o for _, token in worker.inflight for o in self._one_copy(worker, ShardOutcome(
            token, None, f"worker {reason}", lost_with_node=with_node or no_fault))]
        if worker.retiring or len(self._serving()) >= self.num_workers:
            logger.warning("worker %d %s; %d shard(s) to retry", worker.index, reason, len(lost))
            return lost
        fresh = self._add()
        logger.warning("worker %d %s; started worker %d, %d shard(s) to retry",
                       worker.index, reason, fresh.index, len(lost))
        return lost

    def _stop_drained(self) -> None:
        """Stop the retiring workers that hold no shard any more."""
        for worker in [w for w in self._workers if w.retiring and not w.inflight]:
            ray.kill(worker.actor, no_restart=True)
            self._workers.remove(worker)

    def _settle_setup(self, worker: _Worker, ref) -> list[ShardOutcome]:
        """A worker finished loading: it may take shards now, or it failed and is replaced
        (workers failing one after another on healthy nodes stop the pool)."""
        if worker not in self._workers:
            return []
        try:
            info = ray.get(ref)
        except RayActorError as exc:
            return self._replace(worker, "lost while loading the model",
                                 self._lost_with_node(worker, exc))
        except Exception as exc:  # noqa: BLE001 - a worker that cannot load is replaced
            self._load_failures += 1
            if self._load_failures >= LOAD_FAILURES_IN_A_ROW:
                raise PoolError(f"{self._load_failures} workers in a row failed to load the "
                                f"model (last: {first_line(exc)}); check the worker logs "
                                f"(ray logs) and the model") from None
            return self._replace(worker, f"failed to load the model: {first_line(exc)}")
        self.took_loaded(worker, info)
        logger.info("worker %d loaded its model on node %s; it takes shards", worker.index,
                    (worker.node_id or "?")[:12])
        return []

    def took_loaded(self, worker: _Worker, info: dict) -> None:
        """``worker`` loaded its model (``info``: its setup): it takes shards from now on."""
        self._load_failures = 0
        worker.setup_ref = None
        worker.placement = {**{k: info.get(k) for k in ("node_id", "ip")}, "gpu_ids": info.get("gpu_ids", [])}
        if self.on_loaded is not None:
            self.on_loaded(info)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
