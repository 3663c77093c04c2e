"""The scheduler's retry and commit policy, against a scripted fake pool: no Ray, no model.

Each row's script says what every attempt at it does: "ok", "retry" (a retryable failure),
"fail" (a final failure) or "lose" (its worker dies with the whole shard).
"""

from __future__ import annotations

from collections import deque

import pytest

from cluster.protocol import ShardOutcome
from jobs import manifest
from jobs.plan import PlannedRow
from jobs.progress import Progress
from jobs.receipts import Receipts
from jobs.schedule import Scheduler, Shard
from rendering.contract import Artifact, Result, Task


class ScriptedPool:
    """A pool whose workers do what each row's script says, one step per attempt."""

    def __init__(self, scripts: dict[str, list[str]], capacity: int = 2):
        self.scripts = {k: deque(v) for k, v in scripts.items()}
        self.capacity = capacity
        self.queue: deque = deque()
        self.replaced = 0
        self.submitted: list[list[str]] = []  # row ids of each accepted shard
        self.refused = 0

    def start(self) -> list[dict]:
        return [{"device": "fake"}]

    def placements(self) -> list[dict]:
        return [{"node_id": "fake", "gpu_ids": []}]

    def submit(self, token, tasks: list[Task], max_per_worker: int) -> bool:
        if len(self.queue) >= min(self.capacity, max_per_worker):
            self.refused += 1
            return False
        self.queue.append((token, tasks))
        self.submitted.append([t.id for t in tasks])
        return True

    def wait(self, timeout_s: float) -> list[ShardOutcome]:
        token, tasks = self.queue.popleft()
        steps = [self.scripts[t.id].popleft() for t in tasks]
        if "lose" in steps:
            self.replaced += 1
            return [ShardOutcome(token, None, "worker died: killed")]
        return [ShardOutcome(token, [_result(t, step) for t, step in zip(tasks, steps)])]

    def shutdown(self) -> None:
        self.queue.clear()


def _result(task: Task, step: str) -> Result:
    if step == "ok":
        return Result(task.id, True, [Artifact("video", f"videos/{task.key}.mp4", 1, "0" * 64)])
    return Result.failure(task.id, "render_error", step, retryable=step == "retry")


def _rows(ids: list[str]) -> list[PlannedRow]:
    params = {"num_frames": 8, "height": 32, "width": 32}
    return [PlannedRow(i, row_id, 0, "a prompt", {},
                       Task(row_id, row_id, i, "a prompt", params)) for i, row_id in enumerate(ids)]


def _run(tmp_path, scripts: dict[str, list[str]], shard_size: int = 2, max_attempts: int = 3,
         shards: list[Shard] | None = None, capacity: int = 2):
    pool = ScriptedPool(scripts, capacity)
    started = []
    output = str(tmp_path / "out")
    scheduler = Scheduler(lambda: started.append(1) or pool, output, Progress(0, enabled=False),
                          Receipts(output), max_attempts=max_attempts, shard_size=shard_size,
                          shards_per_worker=2)
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


def test_rows_already_final_commit_without_starting_any_worker(tmp_path):
    invalid = {"id": "x", "row_index": 0, "occurrence": 0, "prompt": None, "status": "failed",
               "error_code": "invalid_prompt", "error": "invalid_prompt: blank", "key": None}
    _, _, by_id, n, starts = _run(tmp_path, {}, shards=[Shard([], [invalid])])
    assert (n, starts) == (1, 0)
    assert by_id["x"]["error_code"] == "invalid_prompt"


@pytest.mark.parametrize("capacity", [1, 3])
def test_commits_match_the_input_whatever_the_pool_capacity(tmp_path, capacity):
    scripts = {f"r{i}": ["retry", "ok"] if i % 3 == 0 else ["ok"] for i in range(9)}
    _, _, by_id, n, _ = _run(tmp_path, scripts, capacity=capacity)
    assert n == 9 and all(r["status"] == "ok" for r in by_id.values())
    assert sorted(r["attempts"] for r in by_id.values()) == [1] * 6 + [2] * 3
