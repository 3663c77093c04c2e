"""The shipped examples run clean, as the README shows them: ``make demo`` (configs/demo.yaml)
and the tiny two-stage job (configs/tiny-keyframe-to-video.yaml), each over the shipped demo
prompts, on a local Ray cluster."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import REPO, by_id, read_manifest, run_cli
from PIL import Image
from videos import probe

CONFIGS = os.path.join(REPO, "configs")
README = open(os.path.join(REPO, "README.md")).read()

pytestmark = pytest.mark.slow  # minutes: whole jobs and processes


def test_make_demo_renders_every_demo_prompt(tmp_path):
    dry = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert ".venv/bin/reelfarm render configs/demo.yaml" in dry.stdout, dry.stdout
    out = tmp_path / "demo"
    result = run_cli("render", os.path.join(CONFIGS, "demo.yaml"), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows: 12  ok: 12  failed: 0" in result.stdout
    assert run_cli("verify", str(out)).returncode == 0
    rows = by_id(read_manifest(out))
    assert probe(str(out / rows["demo-11"]["video_uri"]))["frames"] == 25  # its own num_frames


def test_the_tiny_two_stage_example_runs_as_the_readme_shows_and_again_byte_identical(tmp_path):
    hashes = []
    for name in ("first", "again"):
        out = tmp_path / name
        result = run_cli("render", os.path.join(CONFIGS, "tiny-keyframe-to-video.yaml"),
                         "--output", str(out), "--quiet")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "rows: 12  ok: 12  failed: 0" in result.stdout and result.stdout.split(
            "rows:")[1].split("\n")[0] in README
        status = run_cli("status", str(out)).stdout
        for line in ("12 of 12 rows committed (complete)", "  ok: 12",
                     "  keyframe: 12 made, 0 failed", "  video: 12 made, 0 failed"):
            assert line in status and line in README, line
        assert run_cli("verify", str(out)).returncode == 0
        rows = by_id(read_manifest(out))
        for row in rows.values():
            artifacts = {a["name"]: a for a in row["artifacts"]}
            # The keyframe is the stage's own 128x128 picture; the video is the row's 64x64.
            with Image.open(out / artifacts["keyframe"]["path"]) as image:
                assert (image.format, image.size) == ("PNG", (128, 128))
            assert probe(str(out / artifacts["video"]["path"]))["size"] == (64, 64)
            assert [(s["name"], s["height"], s["width"]) for s in row["stages"]] == [
                ("keyframe", 128, 128), ("video", 64, 64)]
        for listed in ("demo-00-804429543217.png", "demo-01-fc74e5b57236.png"):
            assert (out / "stages" / "keyframe" / listed).exists() and listed in README
        hashes.append({i: [a["sha256"] for a in r["artifacts"]] for i, r in rows.items()})
    assert len(hashes[0]) == 12 and hashes[0] == hashes[1]
