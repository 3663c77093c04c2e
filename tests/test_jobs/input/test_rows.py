"""Ids, seeds, output keys and planning: pure functions every run must agree on."""

from __future__ import annotations

from helpers import tiny_config, write_prompts

import hashlib

import numpy as np
import pytest

from jobs.store import manifest
from jobs import params
from jobs.config import validate
from jobs.input.dataset import open_dataset
from jobs.store.hashset import HashSet, row_hash
from jobs.input.plan import PlanCounts, plan_rows
from jobs.input.rows import content_id, output_key, resolve, row_seed


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
    assert (task.params["num_frames"], task.params["height"], task.params["guidance_scale"]) == \
        (12, 32, cfg.render.guidance_scale)
    assert task.seed == row_seed(cfg.render.seed, "r1")
    assert resolve({"prompt": "p", "seed": 42}, "r1", cfg).seed == 42


def test_every_parameter_is_a_manifest_column_a_row_override_and_a_batch_rule():
    cfg = validate(tiny_config("in", "out", render={"strength": 0.5}))
    for param in params.PARAMS:
        assert manifest.SCHEMA.field(param.name).type == param.arrow
        assert param.name in resolve({"prompt": "p"}, "r", cfg).params or param.name == "seed"
    base = resolve({"prompt": "p"}, "r", cfg)
    other_strength = resolve({"prompt": "p", "strength": 0.9}, "r", cfg)
    other_seed = resolve({"prompt": "p", "seed": 5}, "r", cfg)
    with_negative = resolve({"prompt": "p", "negative_prompt": "blur"}, "r", cfg)
    other_negative = resolve({"prompt": "p", "negative_prompt": "noise"}, "r", cfg)
    assert other_strength.params["strength"] == 0.9 and base.params["strength"] == 0.5
    assert other_strength.batch_key != base.batch_key  # one call takes one strength
    assert other_seed.batch_key == base.batch_key  # each video has its own generator
    assert with_negative.batch_key != base.batch_key
    assert with_negative.batch_key == other_negative.batch_key


@pytest.mark.parametrize("value, error", [
    (1.5, "strength 1.5 is outside [0, 1]"),
    ("high", "strength must be a number, got 'high'"),
])
def test_a_bad_strength_fails_its_row(value, error):
    failure = resolve({"prompt": "p", "strength": value}, "r", validate(tiny_config("in", "out")))
    assert (failure.error_code, failure.error) == ("invalid_value", f"invalid_value: {error}")


def test_media_identity_is_part_of_the_content_id(tmp_path):
    fox_a = {"prompt": "a red fox", "image": "a.png"}
    fox_b = {"prompt": "a red fox", "image": "b.png"}
    assert content_id(fox_a) != content_id(fox_b)
    assert content_id(fox_a) == content_id(dict(fox_a))
    inline = {"prompt": "a red fox", "image": {"bytes": b"\x89PNG one", "path": "x.png"}}
    assert content_id(inline) != content_id({**inline, "image": {"bytes": b"\x89PNG two"}})
    assert content_id(inline) == content_id({**inline, "image": b"\x89PNG one"})


def test_media_inputs_resolve_against_the_input_folder_and_stay_inside_the_roots(tmp_path):
    (tmp_path / "images").mkdir()
    src = str(tmp_path / "prompts.parquet")
    cfg = validate(tiny_config(src, str(tmp_path / "out")))
    task = resolve({"prompt": "p", "image": "images/fox.png"}, "r", cfg)
    assert task.inputs["image"].uri == str(tmp_path / "images" / "fox.png")
    inline = resolve({"prompt": "p", "image": {"bytes": b"raw", "path": "fox.png"}}, "r", cfg)
    assert inline.inputs["image"].sha256 == hashlib.sha256(b"raw").hexdigest()
    for hostile in ("../secret.png", "/etc/passwd", "http://127.0.0.1:9/x.png",
                    f"file://{tmp_path.parent}/x.png"):
        failure = resolve({"prompt": "p", "image": hostile}, "r", cfg)
        assert failure.error_code == "invalid_media", hostile
        assert failure.error.startswith("invalid_media: image: ")
    big = validate(tiny_config(src, "out", limits={"max_media_bytes": 2}))
    assert resolve({"prompt": "p", "image": b"abc"}, "r", big).error == (
        "invalid_media: image holds 3 bytes, over limits.max_media_bytes = 2")


def test_hashset_membership():
    s = HashSet()
    for start in range(0, 5000, 100):
        s.add([row_hash(str(i)) for i in range(start, start + 150)])
    assert len(s) == 5050
    found = s.contains([row_hash(str(i)) for i in range(5040, 5060)])
    assert found.tolist() == [True] * 10 + [False] * 10


def test_a_hashset_made_whole_is_one_run_of_distinct_hashes():
    chunks = [np.array([row_hash(str(i)) for i in range(start, start + 150)], dtype=np.uint64)
              for start in range(0, 5000, 100)]
    s = HashSet.of(chunks)
    assert chunks == [] and len(s) == 5050 and len(s.runs()) == 1
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
