"""CLIP scores, the quality gate and previews in a real job (tiny:modelscope scored by tiny:clip).

With the tiny models' random weights "a cat", "m" and "x" score above 0 and most other prompts
clamp to 0, which gives the gate rows on both sides of a threshold.
"""

from __future__ import annotations

import os

import pytest
from helpers import tiny_config, write_prompts
from helpers import read_manifest
from PIL import Image

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render
from rendering.quality import retry_seed

PROMPTS = ["a cat", "m", "x", "a dog", "q"]
FRAMES = 8


def _job(tmp_path, name: str, **quality) -> list[dict]:
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    out = str(tmp_path / name)
    cfg = validate(tiny_config(src, out, cluster={"backend": "inline"},
                               quality={"clip_model": "tiny:clip", **quality},
                               encode={"previews": ["gif", "webp", "poster"],
                                       "preview_max_side": 24}))
    render(cfg, progress=False)
    return read_manifest(out)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scored")
    return folder, _job(folder, "out")


def test_every_ok_row_has_its_scores_in_range(scored):
    _, rows = scored
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert len(row["clip_scores"]) == FRAMES
        assert all(0 <= s <= 100 for s in row["clip_scores"])
        assert row["clip_score"] == pytest.approx(sum(row["clip_scores"]) / FRAMES)
        assert row["clip_score_min"] == min(row["clip_scores"])
        assert row["clip_scores"][row["clip_worst_frame"]] == row["clip_score_min"]
        assert -1 <= row["clip_temporal_consistency"] <= 1
        assert row["clip_drift_frames"] == sum(s < 20 for s in row["clip_scores"])
        assert row["quality_passed"] is None  # no gate
    assert sum(r["clip_score"] > 0 for r in rows) >= 2  # the gate tests need both sides


def test_previews_decode_and_verify_catches_a_missing_one(scored):
    folder, rows = scored
    out = folder / "out"
    for row in rows:
        previews = {a["name"]: out / a["path"] for a in row["artifacts"] if a["name"] != "video"}
        assert set(previews) == {"gif", "webp", "poster"}
        with Image.open(previews["gif"]) as gif:
            assert gif.n_frames == FRAMES and max(gif.size) <= 24
        with Image.open(previews["webp"]) as webp:
            assert webp.is_animated and webp.n_frames == FRAMES
        with Image.open(previews["poster"]) as poster:
            assert poster.format == "JPEG" and poster.size == (24, 24)
    assert verify(str(out)).problems == []
    gone = next(a for a in rows[0]["artifacts"] if a["name"] == "webp")
    os.rename(out / gone["path"], out / "kept-aside")
    try:
        assert f"webp of row 'r0' is missing: {out / gone['path']}" in verify(str(out)).problems
    finally:
        os.rename(out / "kept-aside", out / gone["path"])


def test_the_gate_retries_exactly_the_rows_below_it_and_keeps_the_best_deterministically(
        tmp_path, scored):
    _, plain = scored
    threshold = sorted(r["clip_score"] for r in plain)[-2]  # the second best passes at once
    first = _job(tmp_path, "a", min_score=threshold, on_fail="retry", max_tries=3)
    second = _job(tmp_path, "b", min_score=threshold, on_fail="retry", max_tries=3)
    for before, row in zip(plain, first, strict=True):
        tries = row["quality_tries"]
        assert tries[0] == {"seed": before["seed"], "clip_score": before["clip_score"]}
        if before["clip_score"] >= threshold:
            assert len(tries) == 1 and row["sha256"] == before["sha256"]
        else:  # tried again with derived seeds until it passed or ran out of tries
            assert [t["seed"] for t in tries] == [retry_seed(before["seed"], k)
                                                  for k in range(1, len(tries) + 1)]
            assert len(tries) == 3 or tries[-1]["clip_score"] >= threshold
        kept = tries[row["quality_kept_try"]]["clip_score"]
        assert kept == max(t["clip_score"] for t in tries) == row["clip_score"]
        assert row["quality_passed"] == (kept >= threshold)
    assert [r["quality_tries"] for r in first] == [r["quality_tries"] for r in second]
    assert [r["sha256"] for r in first] == [r["sha256"] for r in second]


def test_the_gate_can_fail_the_rows_below_it(tmp_path, scored):
    _, plain = scored
    threshold = sorted(r["clip_score"] for r in plain)[-2]
    rows = _job(tmp_path, "fail", min_score=threshold, on_fail="fail")
    for before, row in zip(plain, rows, strict=True):
        if before["clip_score"] >= threshold:
            assert row["status"] == "ok" and row["quality_passed"] is True
        else:
            assert (row["status"], row["error_code"]) == ("failed", "below_min_score")
            assert f"is under quality.min_score = {threshold:g}" in row["error"]
            assert row["clip_score"] == before["clip_score"] and row["video_uri"] is None


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """The rows scored with the tiny aesthetic head too, and no gate."""
    folder = tmp_path_factory.mktemp("rated")
    return _job(folder, "out", aesthetic_model="tiny:aesthetic")


def test_every_ok_row_has_an_embedding_an_aesthetic_and_a_motion_score(rated):
    for row in rated:
        assert len(row["clip_embedding"]) == 32  # tiny:clip's projection size
        assert sum(x * x for x in row["clip_embedding"]) == pytest.approx(1.0, abs=1e-2)
        assert isinstance(row["aesthetic_score"], float)
        assert row["motion_score"] >= 0 and 0 <= row["motion_static_share"] <= 1
        assert row["motion_static"] == (row["motion_score"] < 0.2)
    assert len({tuple(r["clip_embedding"]) for r in rated}) == len(rated)


def test_rules_retry_and_fail_exactly_the_rows_they_name(tmp_path, rated):
    motion = sorted(r["motion_score"] for r in rated)[-2]  # all but the most moving retry
    steady = max(rated, key=lambda r: r["motion_score"])  # the one row not retried
    aesthetic = steady["aesthetic_score"] + 1e-6  # fails it, whatever the others' retries make
    rules = [{"column": "motion_score", "min": motion, "on_fail": "retry"},
             {"column": "aesthetic_score", "min": aesthetic, "on_fail": "fail"}]
    rows = _job(tmp_path, "rules", aesthetic_model="tiny:aesthetic", rules=rules, max_tries=2)
    for before, row in zip(rated, rows, strict=True):
        tries = row["quality_tries"]
        retried = before["motion_score"] < motion
        assert len(tries) == (2 if retried else 1)
        if not retried:  # its only try is the plain render, and is judged as such
            assert row["aesthetic_score"] == before["aesthetic_score"]
        missed = ([f"motion_score >= {motion:g}"] if row["motion_score"] < motion else []) + \
            ([f"aesthetic_score >= {aesthetic:g}"] if row["aesthetic_score"] < aesthetic else [])
        assert row["quality_failed_rules"] == missed
        assert row["quality_passed"] == (not missed)
        if row["aesthetic_score"] < aesthetic:
            assert (row["status"], row["error_code"]) == ("failed", "below_min_score")
            assert "aesthetic_score" in row["error"] and "quality.rules[1]" in row["error"]
        else:
            assert row["status"] == "ok"
    assert rows[rated.index(steady)]["status"] == "failed"
    assert any(len(r["quality_tries"]) == 2 for r in rows)
