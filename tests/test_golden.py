"""Outputs written by an earlier version of reelfarm (tests/golden/, made by its
make_golden.py) keep working: today's code verifies, reports, resumes and repairs them, and a
row rendered again comes out byte for byte as it did then.

A format change that breaks this test must migrate old outputs explicitly, not edit them here.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from golden.make_golden import HERE, job_config, render_rows, restore_videos, write_prompts
from helpers import by_id, read_manifest

from jobs.status import status
from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render
from jobs.store import manifest
from jobs.store.job_file import FORMAT_VERSION, OutputError
from jobs.products.report.page import write_report


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Each golden's rows rendered by today's code, once: where their videos come from."""
    made = {}

    def of(name: str) -> str:
        if name not in made:
            made[name] = str(tmp_path_factory.mktemp("golden-rows") / name)
            render_rows(name, made[name])
        return made[name]
    return of


@pytest.fixture(params=["single", "stages"])
def golden(request, tmp_path, rendered):
    """A copy of one golden output (the tests change it), its videos put back, and the config
    that made it."""
    folder = str(tmp_path / request.param)
    shutil.copytree(os.path.join(HERE, request.param), folder)
    restore_videos(request.param, rendered(request.param), folder)
    return folder, validate(job_config(request.param, folder))


def test_a_golden_output_verifies_and_reports_as_it_was(golden):
    folder, _ = golden
    audit = verify(folder)
    assert audit.problems == [] and audit.rows == 3 and audit.ok == 2
    state = status(folder)
    assert (state["rows"], state["by_status"], state["complete"]) == \
        (3, {"ok": 2, "failed": 1}, True)
    assert [e[0] for e in state["top_errors"]] == ["invalid_prompt"]
    page = open(write_report(folder)).read()
    assert "golden-0" in page and "invalid_prompt" in page


def test_a_golden_output_resumes_a_grown_input_and_repairs_a_damaged_video(golden):
    """... and is migrated: its shard manifests (two, as a format 1 output keeps them) are
    folded into a segment by the resume, two shards a segment."""
    folder, _ = golden
    cfg = job_config(os.path.basename(folder), folder)
    cfg = validate({**cfg, "output": {**cfg["output"], "segment_shards": 2}})
    before = by_id(read_manifest(folder))
    write_prompts(folder, 4)  # the dataset grew by a row: the resume renders only that one
    summary = render(cfg, progress=False)
    assert (summary.skipped, summary.rendered, summary.ok, summary.failed) == (3, 1, 3, 1)
    assert summary.complete and verify(folder).problems == []
    listed = manifest.committed(folder)
    assert len(listed.checkpoint["segments"]) == 1 and len(listed.shards) == 1

    lost = before["golden-0"]
    with open(os.path.join(folder, lost["video_uri"]), "r+b") as video:
        video.truncate(100)  # damaged (a missing one would be no problem while it is in a tar)
    assert any("has 100 bytes" in p for p in verify(folder).problems)
    repaired = render(cfg, progress=False, redo=frozenset({"damaged"}))
    assert repaired.rendered == 1 and verify(folder).problems == []
    now = by_id(read_manifest(folder))
    assert now["golden-0"]["sha256"] == lost["sha256"]  # the same bytes as the old version made
    assert now["golden-0"]["redo_of"] == lost["committed_at"]
    job = json.load(open(os.path.join(folder, "job.json")))
    assert job["counts"] == {"rows": 4, "ok": 3, "failed": 1, "committed": 4}
    assert job["format_version"] == FORMAT_VERSION  # the golden's has none: version 1
    assert len(manifest.committed(folder).checkpoint["segments"]) == 2  # the repair's, folded


def test_an_output_of_a_newer_format_is_refused_not_misread(golden):
    folder, cfg = golden
    path = os.path.join(folder, "job.json")
    job = json.load(open(path))
    json.dump({**job, "format_version": FORMAT_VERSION + 1}, open(path, "w"))
    for action in (lambda: render(cfg, progress=False), lambda: status(folder)):
        with pytest.raises(OutputError, match=f"is in format {FORMAT_VERSION + 1}, newer than"):
            action()
