"""The scheduler's retry and commit policy, against a scripted fake pool: no Ray, no model.

Each row's script says what every attempt at it does: "ok", "retry" (a retryable failure),
"fail" (a final failure) or "lose" (its worker dies with the whole shard).
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque

import pytest

from cluster.protocol import ShardOutcome
from jobs.run.records import record
from jobs.store import manifest
from jobs.input.plan import PlannedRow
from jobs.input.rows import RowFailure
from jobs.run.progress import Progress
from jobs.run.scheduler import NODE_LOSSES_PER_SHARD, Scheduler, Shard
from jobs.config import ModelConfig, OptimizeConfig, ResourcesConfig
from jobs.stages import Stage
from rendering.contract import Artifact, Result, Task


class ScriptedPool:
    """A pool whose workers do what each row's script says, one step per attempt."""

    def __init__(self, scripts: dict[str, list[str]], capacity: int = 2, per_wait: int = 1):
        self.scripts = {k: deque(v) for k, v in scripts.items()}
        self.capacity = capacity
        self.per_wait = per_wait  # shards finished by one wait: how fast its workers are
        self.queue: deque = deque()
        self.replaced = 0
        self.submitted: list[list[str]] = []  # row ids of each accepted shard
        self.refused = 0
        self.events = Counter()
        self.demands: list[int] = []  # what the scheduler said the work could use, in order

    num_workers = max_workers = 1

    def start(self) -> list[dict]:
        return [{"device": "fake"}]

    def resize(self, num_workers: int) -> None:
        self.num_workers = num_workers

    def placements(self) -> list[dict]:
        return [{"node_id": "fake", "gpu_ids": []}]

    def loaded(self) -> int:
        return self.num_workers

    def states(self) -> Counter:
        return Counter(busy=min(len(self.queue), self.num_workers),
                       ready=max(0, self.num_workers - len(self.queue)))

    def demand(self, workers: int) -> None:
        if not self.demands or self.demands[-1] != workers:
            self.demands.append(workers)

    def submit(self, token, tasks: list[Task], max_per_worker: int) -> bool:
        if len(self.queue) >= min(self.capacity, max_per_worker):
            self.refused += 1
            return False
        self.queue.append((token, tasks))
        self.submitted.append([t.id for t in tasks])
        return True

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        return [self._finish(*self.queue.popleft())
                for _ in range(min(self.per_wait, len(self.queue)))]

    def _finish(self, token, tasks: list[Task]) -> ShardOutcome:
        steps = [self.scripts[t.id].popleft() for t in tasks]
        if "preempted" in steps:  # the worker's node went: no attempt of its rows
            return ShardOutcome(token, None, "worker lost with its node", lost_with_node=True)
        if "lose" in steps:
            self.replaced += 1
            return ShardOutcome(token, None, "worker died: killed")
        return ShardOutcome(token, [_result(t, step) for t, step in zip(tasks, steps)])

    def shutdown(self) -> None:
        self.queue.clear()


def _result(task: Task, step: str) -> Result:
    if step == "ok":
        return Result(task.id, True, [Artifact("video", f"videos/{task.key}.mp4", 1, "0" * 64,
                                               "video")])
    return Result.failure(task.id, "render_error", step, retryable=step == "retry")


def _stages(output: str, names: list[str]) -> list[Stage]:
    """Stages that take nothing from each other (each row's task is the row's own): the
    scripted pools decide what becomes of it."""
    single = len(names) == 1
    return [Stage(i, name, ModelConfig(path="tiny:modelscope"), OptimizeConfig(), {}, 1,
                  ResourcesConfig(), "video" if single else name, f"stages/{name}",
                  "receipts" if single else f"receipts/{name}", None, output)
            for i, name in enumerate(names)]


def _rows(ids: list[str]) -> list[PlannedRow]:
    params = {"num_frames": 8, "height": 32, "width": 32}
    return [PlannedRow(i, row_id, 0, "a prompt", {},
                       Task(row_id, row_id, i, "a prompt", params)) for i, row_id in enumerate(ids)]


def _run(tmp_path, scripts: dict[str, list[str]], shard_size: int = 2, max_attempts: int = 3,
         shards: list[Shard] | None = None, capacity: int = 2, into: dict | None = None):
    """Schedule the scripted rows; ``into["it"]`` holds the scheduler even if the run raises."""
    pool = ScriptedPool(scripts, capacity)
    started = []
    output = str(tmp_path / "out")
    scheduler = Scheduler(_stages(output, ["video"]), lambda: (started.append(1) or [pool], None),
                          output,
                          Progress(len(scripts), enabled=False), max_attempts=max_attempts,
                          shard_size=shard_size, shards_per_worker=2)
    if into is not None:
        into["it"] = scheduler
    rows = _rows(list(scripts))
    if shards is None:
        shards = [Shard(rows[i:i + shard_size]) for i in range(0, len(rows), shard_size)]
    scheduler.run(iter(shards))
    committed = [r for t in manifest.iter_shards(output) for r in t.to_pylist()]
    return scheduler, pool, {r["id"]: r for r in committed}, len(committed), len(started)


def test_every_row_is_committed_once_and_the_pool_refusing_work_only_delays_it(tmp_path):
    scripts = {f"r{i}": ["ok"] for i in range(7)}
    scheduler, pool, by_id, n, starts = _run(tmp_path, scripts, capacity=1)
    assert n == 7 and set(by_id) == set(scripts) and starts == 1
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in by_id.values())
    assert scheduler.rendered == 7 and pool.refused > 0


def test_a_stop_inside_a_commit_counts_only_the_rows_committed_as_rendered(tmp_path, monkeypatch):
    """A SIGTERM is a KeyboardInterrupt raised wherever the driver is: one raised while a
    shard's manifest is written leaves that shard uncommitted and uncounted."""
    write_shard = manifest.write_shard
    calls = []

    def stopped_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(manifest, "write_shard", stopped_on_the_third)
    scheduler = {}
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, {f"r{i}": ["ok"] for i in range(8)}, capacity=1, into=scheduler)
    committed = sum(t.num_rows for t in manifest.iter_shards(str(tmp_path / "out")))
    assert committed == 4 and scheduler["it"].rendered == 4


def test_a_retryable_failure_is_retried_and_a_final_one_is_committed_at_once(tmp_path):
    scripts = {"flaky": ["retry", "retry", "ok"], "bad": ["fail"], "good": ["ok"]}
    _, _, by_id, n, _ = _run(tmp_path, scripts)
    assert n == 3
    assert (by_id["flaky"]["status"], by_id["flaky"]["attempts"]) == ("ok", 3)
    assert (by_id["bad"]["status"], by_id["bad"]["attempts"]) == ("failed", 1)
    assert by_id["bad"]["error"] == "render_error: fail"
    assert (by_id["good"]["status"], by_id["good"]["attempts"]) == ("ok", 1)


def test_retries_stop_at_max_attempts(tmp_path):
    _, _, by_id, _, _ = _run(tmp_path, {"flaky": ["retry"] * 5}, max_attempts=2)
    assert (by_id["flaky"]["status"], by_id["flaky"]["attempts"]) == ("failed", 2)
    assert by_id["flaky"]["error_code"] == "render_error"


def test_a_row_that_kills_its_worker_is_isolated_and_fails_alone(tmp_path):
    scripts = {"a": ["lose", "ok"], "poison": ["lose"] * 3, "b": ["lose", "ok"], "c": ["ok"]}
    scheduler, pool, by_id, n, _ = _run(tmp_path, scripts, shard_size=3)
    assert n == 4
    assert (by_id["poison"]["status"], by_id["poison"]["error_code"]) == ("failed", "worker_lost")
    assert by_id["poison"]["attempts"] == 3
    assert {by_id[k]["status"] for k in "abc"} == {"ok"}
    # After the loss, each lost row was retried in a shard of its own.
    assert pool.submitted[0] == ["a", "poison", "b"]
    assert all(len(s) == 1 for s in pool.submitted[2:])
    assert scheduler.workers_replaced == 3


def test_shards_lost_with_their_node_spend_no_attempt_however_often(tmp_path):
    """Preemptions are the cluster's doing, not the rows': more of them than max_attempts
    still end in one ok commit of each row, in its own shard, at its first attempt."""
    scripts = {"a": ["preempted"] * 5 + ["ok"], "b": ["preempted"] * 5 + ["ok"], "c": ["ok"]}
    assert 5 < NODE_LOSSES_PER_SHARD
    _, pool, by_id, n, _ = _run(tmp_path, scripts, max_attempts=2)
    assert n == 3 and {r["status"] for r in by_id.values()} == {"ok"}
    assert by_id["a"]["attempts"] == by_id["b"]["attempts"] == 1
    assert pool.submitted.count(["a", "b"]) == 6  # the same shard each time, not split


def test_a_shard_that_takes_its_node_down_every_time_is_not_retried_forever(tmp_path):
    """Past NODE_LOSSES_PER_SHARD losses a shard's losses count: its rows are retried alone
    and fail on their own attempts, as any row that kills its worker."""
    scripts = {"oom": ["preempted"] * 30, "c": ["ok"]}
    _, pool, by_id, n, _ = _run(tmp_path, scripts, max_attempts=2, shard_size=1)
    assert n == 2 and (by_id["oom"]["status"], by_id["oom"]["error_code"]) == (
        "failed", "worker_lost")
    assert pool.submitted.count(["oom"]) == NODE_LOSSES_PER_SHARD + 2


def test_the_pool_is_told_what_the_work_left_could_use_and_zero_at_the_tail(tmp_path):
    scripts = {f"r{i}": ["ok"] for i in range(12)}
    _, pool, _, n, _ = _run(tmp_path, scripts, shard_size=2)  # a round of 2 shards a worker
    assert n == 12 and pool.demands[0] == 3 and pool.demands[-1] == 0
    assert pool.demands == sorted(pool.demands, reverse=True)  # it only drops as rows commit


def test_rows_already_final_commit_without_starting_any_worker(tmp_path):
    invalid = record(PlannedRow(0, "x", 0, None, {}, RowFailure(
        "x", "invalid_prompt", "invalid_prompt: blank", {})))
    _, _, by_id, n, starts = _run(tmp_path, {}, shards=[Shard([], [invalid])])
    assert (n, starts) == (1, 0)
    assert by_id["x"]["error_code"] == "invalid_prompt"


@pytest.mark.parametrize("capacity", [1, 3])
def test_commits_match_the_input_whatever_the_pool_capacity(tmp_path, capacity):
    scripts = {f"r{i}": ["retry", "ok"] if i % 3 == 0 else ["ok"] for i in range(9)}
    _, _, by_id, n, _ = _run(tmp_path, scripts, capacity=capacity)
    assert n == 9 and all(r["status"] == "ok" for r in by_id.values())
    assert sorted(r["attempts"] for r in by_id.values()) == [1] * 6 + [2] * 3


# --- stages -------------------------------------------------------------------------------


def _run_stages(tmp_path, scripts: list[dict[str, list[str]]], capacities: list[int],
                backlog_rows: int | None = None, shard_size: int = 2, watch=None,
                speeds: list[int] | None = None):
    """Run rows through one scripted pool per stage ("k", "v", ...) finishing ``speeds``
    shards a wait; ``watch(scheduler)`` is called at every submission to the first stage."""
    pools = [ScriptedPool(s, c, n) for s, c, n in zip(scripts, capacities, speeds or [1] * 3)]
    output = str(tmp_path / "out")
    names = ["k", "v", "w"][:len(pools)]
    scheduler = Scheduler(_stages(output, names), lambda: (pools, None), output,
                          Progress(0, enabled=False),
                          max_attempts=3, shard_size=shard_size, shards_per_worker=2,
                          backlog_rows=backlog_rows)
    if watch is not None:
        submit = pools[0].submit
        pools[0].submit = lambda *a: (watch(scheduler), submit(*a))[1]
    rows = _rows(list(scripts[0]))
    scheduler.run(iter([Shard(rows[i:i + shard_size]) for i in range(0, len(rows), shard_size)]))
    committed = [r for t in manifest.iter_shards(output) for r in t.to_pylist()]
    return scheduler, pools, {r["id"]: r for r in committed}, len(committed)


def test_rows_flow_through_the_stages_and_a_row_failed_in_one_never_reaches_the_next(tmp_path):
    first = {"a": ["ok"], "bad": ["fail"], "flaky": ["retry", "ok"], "lost": ["lose", "ok"]}
    second = {"a": ["ok"], "flaky": ["ok"], "lost": ["retry", "ok"]}
    scheduler, pools, by_id, n = _run_stages(tmp_path, [first, second], [2, 2])
    assert n == 4 and scheduler.rendered == 3
    assert "bad" not in {i for shard in pools[1].submitted for i in shard}
    bad = by_id["bad"]
    assert (bad["status"], bad["failed_stage"], bad["error"]) == ("failed", "k", "render_error: fail")
    assert [s["name"] for s in bad["stages"]] == ["k"]

    def attempts(row_id):
        return [(s["name"], s["status"], s["attempts"]) for s in by_id[row_id]["stages"]]

    assert attempts("a") == [("k", "ok", 1), ("v", "ok", 1)]
    assert attempts("flaky") == [("k", "ok", 2), ("v", "ok", 1)]
    assert attempts("lost") == [("k", "ok", 2), ("v", "ok", 2)]  # retries counted per stage
    assert by_id["lost"]["attempts"] == 4 and by_id["lost"]["failed_stage"] is None
    # Every stage's artifact is kept: the keyframe's then the video's.
    assert [a["name"] for a in by_id["a"]["artifacts"]] == ["video", "video"]


@pytest.mark.parametrize("backlog, workers, bound", [
    (2, 1, 2), (6, 1, 6),
    # By default two rounds of shards (2 a worker, of 2 rows) for the next stage's workers as
    # it has them at the time: a rebalance that gives it more lets the first run further ahead.
    (None, 1, 8), (None, 3, 24)])
def test_a_stage_runs_ahead_of_the_next_by_at_most_its_backlog(tmp_path, backlog, workers, bound):
    ids = [f"r{i}" for i in range(40)]
    ahead = []

    def watch(scheduler):
        fast, slow = scheduler.stages
        slow.pool.num_workers = workers
        ahead.append(fast.rows_inflight() + slow.rows_held())

    _, pools, by_id, n = _run_stages(tmp_path, [{i: ["ok"] for i in ids}, {i: ["ok"] for i in ids}],
                                     [2, 1], backlog_rows=backlog, watch=watch, speeds=[2, 1])
    assert n == 40 and all(r["status"] == "ok" for r in by_id.values())
    # A shard starts only while fewer than ``bound`` rows are ahead, and the fast stage kept
    # going up to the bound.
    assert bound - 2 <= max(ahead) < bound


def test_rows_whose_first_stage_an_interrupted_run_stored_start_at_the_second(tmp_path):
    from rendering.contract import receipt_json

    output = tmp_path / "out"
    done = _rows(["done"])[0].outcome
    (output / "stages").mkdir(parents=True)
    (output / "stages" / "done.png").write_bytes(b"keyframe")
    stored = Result(done.id, True, [Artifact("k", "stages/done.png", 8,
                                             hashlib.sha256(b"keyframe").hexdigest(), "image")])
    (output / "receipts" / "k").mkdir(parents=True)
    (output / "receipts" / "k" / "done.json").write_bytes(receipt_json(done, stored))

    _, pools, by_id, n = _run_stages(tmp_path, [{"done": [], "todo": ["ok"]},
                                                {"done": ["ok"], "todo": ["ok"]}], [2, 2])
    assert n == 2 and pools[0].submitted == [["todo"]]
    assert sorted(i for shard in pools[1].submitted for i in shard) == ["done", "todo"]
    assert by_id["done"]["stages"][0]["attempts"] == 1 and by_id["done"]["status"] == "ok"
    assert not (output / "receipts" / "k" / "done.json").exists()  # removed once committed


def test_the_live_figures_count_the_rows_each_stage_settled(tmp_path):
    """What ``on_sample`` gets (the metrics' gauges and ``status``'s live lines): figures after
    the first results, and the last once every row is committed."""
    pool = ScriptedPool({"a": ["retry", "ok"], "b": ["ok"], "c": ["fail"], "d": ["ok"]})
    output, samples = str(tmp_path / "out"), []
    scheduler = Scheduler(_stages(output, ["video"]), lambda: ([pool], None), output,
                          Progress(4, enabled=False), max_attempts=3, shard_size=2,
                          shards_per_worker=2, on_sample=samples.append)
    rows = _rows(["a", "b", "c", "d"])
    scheduler.run(iter([Shard(rows[:2]), Shard(rows[2:])]))
    first, last = samples[0], samples[-1]
    assert first["to_do"] == 4 and first["committed"] + first["remaining"] == 4
    assert first["remaining"] > 0 and len(samples) >= 2
    assert (last["committed"], last["failed"], last["remaining"], last["eta_s"]) == (4, 1, 0, 0.0)
    (video,) = last["stages"]
    assert (video["name"], video["made"], video["failed"]) == ("video", 3, 1)
    assert (video["inflight"], video["waiting"]) == (0, 0)
    assert video["states"] == {"ready": 1, "busy": 0} and video["gpus"] == []
