"""The nightly job: dated input and output, resume after a failed attempt, a readable summary."""

from __future__ import annotations

import datetime as dt
import json
import signal

import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli, tiny_config, write_prompts
from helpers import CliDriver, committed_shards, wait_for, write_config

from jobs.verify import verify
from jobs.config import ConfigError, validate
from jobs.nightly import SUMMARY_FILE, for_night, night_of

NIGHT = "2026-01-05"


def _config(tmp_path, **sections) -> dict:
    return tiny_config(str(tmp_path / "prompts" / "{date}.parquet"),
                       str(tmp_path / "renders" / "{date:%Y/%m/%d}"), **sections)


def test_the_night_fills_the_dated_uris_and_an_undated_output_is_refused(tmp_path):
    cfg = validate(_config(tmp_path))
    dated = for_night(cfg, dt.date(2026, 1, 5))
    assert dated.input.uri == str(tmp_path / "prompts" / "2026-01-05.parquet")
    assert dated.output.uri == str(tmp_path / "renders" / "2026" / "01" / "05")
    assert "{date}" in cfg.input.uri  # the template itself is left alone

    undated = validate(tiny_config("in/{date}.parquet", str(tmp_path / "renders")))
    with pytest.raises(ConfigError, match=r"output.uri: a nightly job needs \{date\}"):
        for_night(undated, dt.date(2026, 1, 5))
    with pytest.raises(ConfigError, match=r"input.uri: only \{date\}"):
        for_night(validate(tiny_config("in/{day}.parquet", "out/{date}")), dt.date(2026, 1, 5))
    with pytest.raises(ConfigError, match="--date '5 Jan': expected YYYY-MM-DD"):
        night_of("5 Jan")
    assert night_of(None) == dt.datetime.now(dt.timezone.utc).date()


@pytest.mark.slow
def test_a_failed_night_is_resumed_and_every_attempt_is_summarised(tmp_path):
    rows = 24
    (tmp_path / "prompts").mkdir()
    write_prompts(tmp_path / "prompts" / f"{NIGHT}.parquet", prompts(rows))
    write_prompts(tmp_path / "prompts" / "2026-01-04.parquet", prompts(3, prefix="yesterday"))
    config = write_config(tmp_path, _config(tmp_path, output={"shard_size": 2},
                                            render={"num_inference_steps": 4}),
                          name="nightly.yaml")
    out = tmp_path / "renders" / "2026" / "01" / "05"

    # Attempt 1 is stopped (as a preempted pod is, by SIGTERM) once some shards are committed.
    with CliDriver("nightly", str(config), "--date", NIGHT, "--quiet") as first:
        wait_for(lambda: len(committed_shards(out)) >= 2, 120, "two committed shards", first)
        _, stderr = first.stop(signal.SIGTERM)
    assert first.returncode == 1, stderr[-2000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["date"] == NIGHT and summary["status"] == "incomplete"
    assert [a["status"] for a in summary["attempts"]] == ["interrupted"]
    done_before = summary["ok"]
    assert 0 < done_before < rows and summary["pending"] == rows - done_before
    assert summary["attempts"][0]["rendered"] == done_before

    # Attempt 2, the same command: renders only what attempt 1 did not commit.
    second = run_cli("nightly", str(config), "--date", NIGHT, "--quiet")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"night {NIGHT}: complete (attempt 2)" in second.stdout
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "complete"
    assert (summary["rows"], summary["ok"], summary["failed"], summary["pending"]) == (rows, rows, 0, 0)
    assert [a["status"] for a in summary["attempts"]] == ["interrupted", "complete"]
    assert summary["attempts"][1]["skipped"] == done_before
    assert summary["attempts"][1]["rendered"] == rows - done_before
    assert summary["rendered"] == rows and summary["videos_per_hour"] > 0
    assert summary["top_errors"] == []
    table = pq.read_table(out / "manifest.parquet")
    assert sorted(table["id"].to_pylist()) == sorted(p["id"] for p in prompts(rows))
    assert verify(str(out)).problems == []

    # A scheduler's retry of a finished night renders nothing and says so.
    third = run_cli("nightly", str(config), "--date", NIGHT, "--quiet")
    assert third.returncode == 0, third.stderr[-2000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["attempts"][-1]["rendered"] == 0 and summary["status"] == "complete"
    # The other night's dataset was not touched.
    assert not (tmp_path / "renders" / "2026" / "01" / "04").exists()


def test_a_night_without_its_dataset_fails_clearly_and_is_recorded(tmp_path):
    (tmp_path / "prompts").mkdir()
    config = write_config(tmp_path, _config(tmp_path), name="nightly.yaml")
    result = run_cli("nightly", str(config), "--date", NIGHT)
    assert result.returncode == 1
    assert f"{NIGHT}.parquet" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "renders" / "2026" / "01" / "05" / SUMMARY_FILE).read_text())
    assert summary["status"] == "incomplete"
    assert summary["attempts"][0]["status"] == "failed"
    assert f"{NIGHT}.parquet" in summary["attempts"][0]["error"]


def test_an_attempt_with_failed_rows_reads_like_the_night(tmp_path):
    from jobs import nightly

    (tmp_path / "prompts").mkdir()
    write_prompts(tmp_path / "prompts" / f"{NIGHT}.parquet",
                  prompts(2) + [{"id": "blank", "prompt": "  "}])
    cfg = validate(_config(tmp_path, cluster={"backend": "inline"}))
    summary = nightly.run(cfg, dt.date(2026, 1, 5), progress=False)
    assert summary["status"] == "complete_with_failures"
    assert [a["status"] for a in summary["attempts"]] == ["complete_with_failures"]
