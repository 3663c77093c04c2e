"""Safety flags are recorded, never dropped: a picture SD's safety checker flags (and blacks out)
is kept marked, fails its row, or is rendered again with new seeds (``quality.on_unsafe``), and
a flagged keyframe never reaches the video stage unrecorded.

Real jobs through the driver (inline backend) on tiny:sd-checked, whose checker flags about half
its pictures by seed. Which seeds it flags is read from one kept job's manifest, so every other
job is checked against what the same stage made of the same rows."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from helpers import read_manifest, stages_config, write_prompts
from PIL import Image

from jobs.config import validate
from jobs.driver import render
from rendering.pipelines import ADAPTERS
from rendering.quality import retry_seed

SEEDS = range(12)
MAX_TRIES = 2
# The output fields by which diffusers' pipelines say a picture was flagged: SD's safety checker,
# DeepFloyd IF's watermark detector.
SAFETY_FIELDS = {"nsfw_content_detected", "watermark_detected"}


def test_each_adapter_declares_the_safety_flag_its_pipelines_output_has():
    """Read in the installed diffusers: a pipeline that gains a flag is not silently dropped."""
    import diffusers
    from diffusers.utils import BaseOutput

    for name, adapter in ADAPTERS.items():
        module = sys.modules[getattr(diffusers, name).__module__]
        outputs = [v for v in vars(module).values() if isinstance(v, type)
                   and issubclass(v, BaseOutput) and dataclasses.is_dataclass(v)]
        fields = {f.name for output in outputs for f in dataclasses.fields(output)}
        assert fields & SAFETY_FIELDS == {adapter.safety_flag} - {None}, name


def _render(folder, seeds, keyframe: str = "tiny:sd-checked", **quality) -> tuple:
    """Render one row per seed (keyframe, then a tiny LTX video from it); (summary, output,
    manifest rows by seed)."""
    src = write_prompts(folder / "prompts.parquet", [
        {"id": f"seed-{s}", "prompt": "a small test scene", "seed": s} for s in seeds])
    out = folder / "out"
    cfg = stages_config(src, str(out), keyframe=keyframe, cluster={"backend": "inline"},
                        quality=quality)
    summary = render(validate(cfg), progress=False)
    return summary, out, {row["seed"]: row for row in read_manifest(out)}


def _unsafe_retry(seed: int) -> int:
    return retry_seed(seed, 2, "unsafe")


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """The default (keep) over SEEDS and each one's first safety retry seed: what the checker
    says of every picture the other jobs make."""
    seeds = sorted({*SEEDS, *map(_unsafe_retry, SEEDS)})
    return _render(tmp_path_factory.mktemp("kept"), seeds)


def _flagged(kept) -> dict[int, bool]:
    return {seed: row["safety_flagged"] for seed, row in kept[2].items()}


def _keyframe(row: dict) -> dict:
    return next(a for a in row["artifacts"] if a["name"] == "keyframe")


def _pick(kept, want, what: str) -> int:
    flagged = _flagged(kept)
    found = [s for s in SEEDS if want(flagged[s], flagged[_unsafe_retry(s)])]
    assert found, f"no seed in {SEEDS} {what}: widen SEEDS"
    return found[0]


def test_keep_stores_the_flagged_black_keyframe_marked_and_animates_it(kept):
    summary, out, rows = kept
    assert summary.failed == 0 and summary.ok == len(rows)
    flags = set(_flagged(kept).values())
    assert flags == {True, False}, "the checker flags some pictures and passes others"
    for row in rows.values():
        with Image.open(out / _keyframe(row)["path"]) as image:
            black = not np.asarray(image).any()
        assert black == row["safety_flagged"], row["id"]
        assert [s["name"] for s in row["stages"]] == ["keyframe", "video"]
        assert row["status"] == "ok" and row["safety_retries"] == 0


def test_fail_stops_a_flagged_row_at_its_keyframe_stage(kept, tmp_path):
    bad = _pick(kept, lambda first, _: first, "is flagged")
    good = _pick(kept, lambda first, _: not first, "is passed")
    summary, out, rows = _render(tmp_path, [bad, good], on_unsafe="fail")
    assert (summary.ok, summary.failed) == (1, 1)
    failed = rows[bad]
    assert (failed["status"], failed["error_code"], failed["failed_stage"]) == (
        "failed", "unsafe_content", "keyframe")
    assert failed["error"] == ("unsafe_content: the pipeline's safety checker flagged the "
                               "picture (quality.on_unsafe: fail)")
    assert [s["name"] for s in failed["stages"]] == ["keyframe"]  # the video stage never got it
    assert failed["safety_flagged"] is True and failed["artifacts"] == []
    assert len(list((out / "stages" / "keyframe").iterdir())) == 1  # only the passed row's
    passed = rows[good]
    assert passed["status"] == "ok" and passed["safety_flagged"] is False
    assert [s["name"] for s in passed["stages"]] == ["keyframe", "video"]


def test_retry_renders_a_flagged_row_again_with_a_derived_seed_then_fails_it(kept, tmp_path):
    recovers = _pick(kept, lambda first, retry: first and not retry, "is flagged, its retry not")
    stuck = _pick(kept, lambda first, retry: first and retry, "is flagged, and its retry too")
    good = _pick(kept, lambda first, _: not first, "is passed")
    summary, _, rows = _render(tmp_path, [recovers, stuck, good], on_unsafe="retry",
                               max_tries=MAX_TRIES)
    assert (summary.ok, summary.failed) == (2, 1)
    retried = rows[recovers]
    assert (retried["status"], retried["safety_flagged"], retried["safety_retries"]) == (
        "ok", False, 1)
    # Its keyframe is the picture its retry seed makes as a row of its own.
    assert _keyframe(retried)["sha256"] == \
        _keyframe(kept[2][_unsafe_retry(recovers)])["sha256"]
    failed = rows[stuck]
    assert (failed["error_code"], failed["failed_stage"], failed["safety_retries"]) == (
        "unsafe_content", "keyframe", MAX_TRIES - 1)
    assert failed["error"] == (f"unsafe_content: the pipeline's safety checker flagged all "
                               f"{MAX_TRIES} renders (quality.on_unsafe: retry)")
    assert (rows[good]["safety_flagged"], rows[good]["safety_retries"]) == (False, 0)


def test_a_pipeline_without_a_checker_records_no_flag(kept, tmp_path):
    bad = _pick(kept, lambda first, _: first, "is flagged")
    summary, _, rows = _render(tmp_path, [bad], keyframe="tiny:sd", on_unsafe="fail")
    assert summary.ok == 1
    assert (rows[bad]["safety_flagged"], rows[bad]["safety_retries"]) == (None, None)
