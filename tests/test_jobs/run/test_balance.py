"""How workers are split between stages and moved once speeds are measured: pure arithmetic
and a fake clock, no cluster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from jobs.run.balancer import Balancer, NotEnoughResources, StageNeed, split, throughput


def _needs(*specs) -> list[StageNeed]:
    """(cost, fixed workers, weight) per stage."""
    return [StageNeed(f"s{i}", cost, fixed, weight) for i, (cost, fixed, weight) in enumerate(specs)]


@pytest.mark.parametrize("capacity, needs, expected", [
    (5, _needs((1, None, 1), (1, None, 4)), [1, 4]),  # 1:4 costs on 5 GPUs: both stages at 1 row/s
    (8, _needs((1, None, 1), (1, None, 3)), [2, 6]),
    (2, _needs((0.5, None, 1), (0.5, None, 3)), [1, 3]),  # fractional GPUs share them
    (4, _needs((1, 1, 1), (1, None, 3)), [1, 3]),  # a fixed stage keeps its count
    (4, _needs((1, None, 1), (1, 2, 9)), [1, 2]),  # the bottleneck is fixed: no point in more
    (3, _needs((2, None, 1), (1, None, 1)), [1, 1]),  # no room for another worker of the slowest
])
def test_the_split_makes_the_slowest_stage_as_fast_as_the_cluster_allows(capacity, needs, expected):
    assert split(capacity, needs) == expected


def test_a_stage_range_is_kept_at_its_min_and_grows_no_further_than_its_max():
    keyframe, video = StageNeed("keyframe", 1, None, 1), StageNeed("video", 1, None, 4)
    ranged = StageNeed("video", 1, None, 4, least=1, most=3)
    assert split(16, [keyframe, video]) == [4, 12]
    assert split(16, [keyframe, ranged]) == [1, 3]  # the slowest stage at its max: no more
    assert split(16, [StageNeed("keyframe", 1, None, 1, least=5), video]) == [5, 11]
    with pytest.raises(NotEnoughResources):
        split(4, [StageNeed("keyframe", 1, None, 1, least=4), video])


def test_the_split_respects_a_total_number_of_workers():
    assert split(16, _needs((1, None, 1), (1, None, 4)), max_workers=5) == [1, 4]


def test_a_cluster_too_small_for_one_worker_a_stage_is_refused_naming_what_is_needed():
    with pytest.raises(NotEnoughResources) as refused:
        split(1, _needs((1, None, 1), (1, None, 4)), unit="GPUs")
    assert str(refused.value).startswith("the stages need 2 GPUs (s0 1 x 1, s1 1 x 1) and the "
                                         "cluster has 1: lower resources.gpus/cpus")


class _Pool:
    def __init__(self, workers: int):
        self.num_workers = workers
        self.resized: list[int] = []

    def resize(self, workers: int) -> None:
        self.resized.append(workers)
        self.num_workers = workers


def _stage(name: str, workers: int, ok: int, seconds: float):
    return SimpleNamespace(spec=SimpleNamespace(name=name), pool=_Pool(workers), ok=ok,
                           seconds=seconds)


def test_a_node_that_joins_or_leaves_is_split_between_the_stages_at_once():
    clock, holds = [0.0], [2.0]
    balancer = Balancer(2, _needs((1, None, 1), (1, None, 3)), every_s=300,
                        clock=lambda: clock[0], follow=lambda: holds[0])
    assert balancer.initial() == [1, 1]
    stages = [_stage("keyframe", 1, 0, 0.0), _stage("video", 1, 0, 0.0)]
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[], []]  # the cluster as it was
    holds[0] = 6.0  # a node of 4 GPUs joins: split by the weights (nothing measured yet)
    clock[0] = 1.0
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[], []]  # looked 1 s ago: not yet
    clock[0] = 2.5
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[2], [4]] and balancer.moves == 0
    # Measured 1 s and 1 s a row; the node leaves again: back to what 2 GPUs hold.
    stages = [_stage("keyframe", 2, 20, 20.0), _stage("video", 4, 20, 20.0)]
    holds[0] = 2.0
    clock[0] = 5.0
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[1], [1]]
    # Less than a worker a stage: the pools keep their sizes and wait for capacity.
    stages = [_stage("keyframe", 1, 20, 20.0), _stage("video", 1, 20, 20.0)]
    holds[0] = 1.0
    clock[0] = 8.0
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[], []] and balancer.capacity == 2.0


def test_workers_move_to_the_slow_stage_once_measured_and_not_again_too_soon():
    clock = [0.0]
    balancer = Balancer(4, _needs((1, None, 1), (1, None, 1)), every_s=60, clock=lambda: clock[0])
    assert balancer.initial() == [2, 2]  # equal weights: the guess before measuring
    # Not warmed up: the video stage has made 3 rows, fewer than 2 per worker.
    stages = [_stage("keyframe", 2, 40, 40.0), _stage("video", 2, 3, 12.0)]
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[], []]
    # Measured 1 s and 4 s a row: 1 + 3 workers make 0.75 rows/s, 2 + 2 only 0.5.
    stages = [_stage("keyframe", 2, 40, 40.0), _stage("video", 2, 10, 40.0)]
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[1], [3]] and balancer.moves == 1
    assert throughput([1, 3], [1.0, 4.0]) == 0.75
    # The split is not reconsidered within every_s, and then only for a real gain.
    stages[1].seconds = 10 * 12.0
    clock[0] = 30.0
    balancer.consider(stages)
    assert [s.pool.resized for s in stages] == [[1], [3]]
    clock[0] = 61.0
    stages = [_stage("keyframe", 1, 50, 50.0), _stage("video", 3, 30, 120.0)]
    balancer.consider(stages)  # already the best split
    assert [s.pool.resized for s in stages] == [[], []] and balancer.moves == 1
