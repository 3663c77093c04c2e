"""Workers per stage over a run: a point per change, bounded, and told in one line."""

from __future__ import annotations

from jobs.run.timeline import MAX_POINTS, WorkersTimeline, steps


def test_a_point_per_change_and_the_last_counts_again_at_the_end():
    clock = [100.0]
    timeline = WorkersTimeline(clock=lambda: clock[0])
    for at, video in [(100, 1), (102, 1), (104, 3), (110, 3), (130, 2)]:
        clock[0] = at
        timeline.sample({"video": video})
    clock[0] = 140.0
    points = timeline.close()
    assert [(p["at"], p["workers"]["video"]) for p in points] == [
        (100, 1), (104, 3), (130, 2), (140, 2)]
    assert steps(points, "video") == "1 → 3 → 2"
    assert steps(points, "keyframe") == "0"


def test_a_flapping_fleet_keeps_a_bounded_record_with_its_first_and_last_points():
    clock = [0.0]
    timeline = WorkersTimeline(clock=lambda: clock[0])
    for i in range(10 * MAX_POINTS):
        clock[0] = float(i)
        timeline.sample({"video": i % 2 + 1})
    assert len(timeline.points) <= MAX_POINTS
    assert timeline.points[0]["at"] == 0.0 and timeline.points[-1]["at"] == 10 * MAX_POINTS - 1
    assert [p["at"] for p in timeline.points] == sorted(p["at"] for p in timeline.points)
    long = steps(timeline.points, "video")
    assert "…" in long and len(long.split(" → ")) == 12
