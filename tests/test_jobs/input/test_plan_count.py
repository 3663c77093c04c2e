"""``count_plan`` (the fast counting behind ``reelfarm plan``) must count exactly what the
row-by-row ``plan_rows`` (what ``render`` streams through) counts, on inputs full of awkward
rows, with none, half or all of them already committed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import load_config
from jobs.input.dataset import open_dataset
from jobs.store.hashset import HashSet
from jobs.input.plan import PlanCounts, count_plan, plan_rows
from jobs.input.preflight import preflight

_IDS = ["a", "b", "a", None, "  ", "\u3000", "c\u00e9", "a", "d\nx", "e", "f", "b", "g",
        "h" * 600, "i", "j", "k", "a", "l", "m"]
_PROMPTS = ["p", "q", "r", "s", "t", "u", "v", "w", None, "", " \u2003 ", "x" * 20001, "\u4e00",
            "y", "z\n", "\u00a0", "ok", "ok", "ok", "ok"]
CASES = {
    "string ids": pa.table({"id": _IDS, "prompt": _PROMPTS,
                            "seed": [None] * 16 + [-1, 5, None, 2**62],
                            "num_frames": [None] * 18 + [0, 3.0]}),
    "integer ids": pa.table({"id": pa.array([1, 2, 1, None, -5, 2], pa.int64()),
                             "prompt": ["a", "b", "c", "d", "e", " "]}),
    "content ids": pa.table({"prompt": ["same", "same", "other", None, "\t"]}),
    "binary": pa.table({"id": pa.array([b"a", b"\xff", b"a", None], pa.binary()),
                        "prompt": pa.array([b"x", b"y", b"\xfe", b"z"], pa.binary())}),
    "overrides": pa.table({"id": _IDS, "prompt": _PROMPTS,
                           "negative_prompt": [None] * 19 + ["no"],
                           "guidance_scale": [None] * 18 + [float("nan"), 1.0]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_rows", [3, 64])
def test_count_plan_equals_plan_rows(tmp_path, case, batch_rows):
    path = str(tmp_path / "in.parquet")
    pq.write_table(CASES[case], path)
    cfg = load_config(base={"input": {"uri": path, "batch_rows": batch_rows},
                            "model": {"path": "tiny:modelscope"},
                            "output": {"uri": str(tmp_path / "out")}})
    dataset = open_dataset(path, [])
    everything = list(plan_rows(dataset, cfg, HashSet(), PlanCounts()))
    assert everything, "the case has rows"
    for committed_rows in (everything[:0], everything[::2], everything):
        committed = HashSet()
        committed.add([row.hash for row in committed_rows])
        expected = PlanCounts()
        for _ in plan_rows(dataset, cfg, committed, expected):
            pass
        assert count_plan(dataset, cfg, committed) == expected
    assert expected.done == expected.rows and expected.todo == 0


@pytest.mark.parametrize("batch_rows", [3, 64])
def test_count_plan_equals_plan_rows_with_the_stages_checks(tmp_path, batch_rows):
    """Rows a stage would refuse: LTX's 8k+1 frames and an image per row (one row has one)."""
    path = str(tmp_path / "in.parquet")
    frames = [None, 8, 9, None, 16, 17, None, 25]
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(8)], "num_frames": frames,
                             "image": [None] * 7 + ["pic.png"]}), path)
    cfg = load_config(base={"input": {"uri": path, "batch_rows": batch_rows,
                                      "media_roots": [str(tmp_path)]},
                            "model": {"path": "tiny:ltx-i2v"}, "render": {"num_frames": 9},
                            "output": {"uri": str(tmp_path / "out")}})
    dataset, checks = open_dataset(path, []), preflight(cfg)
    expected = PlanCounts()
    for _ in plan_rows(dataset, cfg, HashSet(), expected, checks=checks):
        pass
    assert count_plan(dataset, cfg, HashSet(), checks) == expected
    assert (expected.refused_rows("invalid_shape"), expected.refused_rows("missing_input")) == \
        (2, 5)
