"""Ids, seeds, output keys and planning: pure functions every run must agree on."""

from __future__ import annotations

from conftest import tiny_config, write_prompts

from jobs.config import validate
from jobs.dataset import open_dataset
from jobs.hashset import HashSet, row_hash
from jobs.plan import PlanCounts, plan_rows
from jobs.rows import content_id, output_key, resolve, row_seed


def test_content_ids_depend_on_what_is_rendered_only():
    a = {"prompt": "a cat", "seed": None, "extra": 1}
    assert content_id(a) == content_id({"prompt": "a cat", "extra": 2})
    assert content_id(a) != content_id({"prompt": "a cat", "seed": 3})
    assert content_id(a).startswith("h") and len(content_id(a)) == 21


def test_seeds_are_stable_and_spread():
    assert row_seed(1, "x") == row_seed(1, "x")
    seeds = {row_seed(1, f"id-{i}") for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(1, "x") != row_seed(2, "x")


def test_output_keys_are_safe_and_distinct():
    ids = ["../../x", "/abs", "-version", ".hidden", "a/b", "a_b", "ünïcode", "x" * 500, "--", ".."]
    keys = [output_key(i) for i in ids]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert "/" not in key and ".." not in key
        assert key[0].isalnum()
        assert len(key) <= 61
    assert output_key("clip-001").startswith("clip-001-")


def test_resolve_applies_defaults_and_row_overrides():
    cfg = validate(tiny_config("in", "out"))
    task = resolve({"prompt": "p", "num_frames": 12, "guidance_scale": None}, "r1", cfg)
    assert (task.num_frames, task.height, task.guidance_scale) == (12, 32, cfg.render.guidance_scale)
    assert task.seed == row_seed(cfg.render.seed, "r1")
    assert resolve({"prompt": "p", "seed": 42}, "r1", cfg).seed == 42


def test_hashset_membership():
    s = HashSet()
    for start in range(0, 5000, 100):
        s.add([row_hash(str(i)) for i in range(start, start + 150)])
    assert len(s) == 5050
    found = s.contains([row_hash(str(i)) for i in range(5040, 5060)])
    assert found.tolist() == [True] * 10 + [False] * 10


def test_plan_marks_repeated_ids_and_skips_committed_rows(tmp_path):
    rows = [{"id": i, "prompt": "p"} for i in ["a", "b", "a", "c", "a"]]
    src = write_prompts(tmp_path / "in.parquet", rows)
    cfg = validate(tiny_config(src, str(tmp_path / "out"), input={"batch_rows": 2}))
    dataset = open_dataset(src, [])
    counts = PlanCounts()
    planned = list(plan_rows(dataset, cfg, HashSet(), counts))
    assert [(p.id, p.occurrence) for p in planned] == [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("a", 2)]
    assert [p.outcome.error_code for p in planned if p.occurrence] == ["duplicate_id", "duplicate_id"]
    committed = HashSet()
    committed.add([planned[0].hash, planned[2].hash])
    counts = PlanCounts()
    left = list(plan_rows(dataset, cfg, committed, counts))
    assert [(p.id, p.occurrence) for p in left] == [("b", 0), ("c", 0), ("a", 2)]
    assert (counts.rows, counts.done, counts.todo) == (5, 2, 3)
