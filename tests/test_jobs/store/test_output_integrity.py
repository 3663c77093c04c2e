"""An output stays whole: a setting that would change its manifest's columns is refused, a copy
verifies and resumes against its own objects, and damaged or failed rows are repaired once.

Each runs on local disk and on a real S3 endpoint (moto on 127.0.0.1), through the CLI.
"""

from __future__ import annotations

import os
import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import prompts, run_cli
from helpers import CliDriver, by_id, read_manifest, wait_for, write_config

from jobs.store import manifest
from jobs.input.rows import output_key


INLINE = {"backend": "inline"}


def test_changing_the_carried_columns_is_refused_and_the_output_stays_readable(tmp_path, place):
    out = f"{place}/carry"
    rows = [{**row, "lang": "en"} for row in prompts(5)]
    config = write_config(tmp_path, rows=rows[:3], output_uri=out, cluster=INLINE,
                          input={"carry_columns": ["lang"]})
    assert run_cli("render", config).returncode == 0

    # More rows, and no carried column.
    config = write_config(tmp_path, rows=rows, output_uri=out, cluster=INLINE)
    refused = run_cli("render", config)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "input.carry_columns: ['lang'] -> []" in refused.stderr
    for command in ("status", "verify"):
        assert run_cli(command, out).returncode == 0, command

    config = write_config(tmp_path, rows=rows, output_uri=out, cluster=INLINE,
                          input={"carry_columns": ["lang"]})
    assert run_cli("render", config).returncode == 0
    assert [r["lang"] for r in by_id(read_manifest(out)).values()] == ["en"] * 5
    assert run_cli("verify", out).returncode == 0


def test_a_copied_output_verifies_and_is_repaired_against_its_own_objects(tmp_path, place):
    original, copy = f"{place}/original", f"{place}/copy"
    config = write_config(tmp_path, rows=prompts(4), output_uri=original, cluster=INLINE)
    assert run_cli("render", config).returncode == 0
    fs, _ = fsspec.core.url_to_fs(original)
    fs.invalidate_cache()
    if place.startswith("s3://"):
        fs.copy(original.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    else:
        shutil.copytree(original, copy)
    rows = by_id(read_manifest(copy))
    fs.rm(f"{copy}/{rows['row-000']['video_uri']}")
    damaged = f"{copy}/{rows['row-001']['video_uri']}"
    fs.pipe_file(damaged, fs.cat_file(damaged)[:-40] + b"\x00" * 40)

    check = run_cli("verify", copy)
    assert check.returncode == 1
    assert "video of row 'row-000' is missing" in check.stdout
    assert "video of row 'row-001' does not match its sha256" in check.stdout
    assert "copy/videos" in check.stdout and "original" not in check.stdout
    assert "not in any manifest" not in check.stdout
    assert run_cli("verify", original).returncode == 0

    repaired = run_cli("render", config, "--output", copy, "--redo", "damaged", "--quiet")
    assert repaired.returncode == 0, repaired.stderr
    assert "rendered 2 video(s)" in repaired.stdout
    assert run_cli("verify", copy).returncode == 0
    assert {r["sha256"] for r in by_id(read_manifest(copy)).values()} == \
        {r["sha256"] for r in by_id(read_manifest(original)).values()}
    again = run_cli("render", config, "--output", copy, "--redo", "damaged", "--quiet")
    assert "rendered 0 video(s)" in again.stdout


def test_failed_rows_are_listed_and_repaired_once_with_their_history_kept(tmp_path):
    out = tmp_path / "out"
    # A folder where row-002's video must go: its upload fails on every attempt.
    blocker = out / "videos" / f"{output_key('row-002')}.mp4"
    blocker.mkdir(parents=True)
    config = write_config(tmp_path, rows=prompts(4), output_uri=str(out),
                          cluster={**INLINE, "max_attempts": 1})
    first = run_cli("render", config)
    assert first.returncode == 3
    listed = run_cli("status", str(out), "--failed")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].startswith("row-002\tupload_error: ")
    assert len(listed.stdout.splitlines()) == 1

    blocker.rmdir()
    repaired = run_cli("render", config, "--redo", "failed", "--quiet")
    assert repaired.returncode == 0, repaired.stderr
    assert "rendered 1 video(s)" in repaired.stdout
    rows = by_id(read_manifest(str(out)))
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"ok"}
    assert rows["row-002"]["redo_of"] is not None
    history = [r for t in manifest.iter_shards(str(out), current=False) for r in t.to_pylist()
               if r["id"] == "row-002"]
    assert [r["status"] for r in history] == ["failed", "ok"]
    assert run_cli("verify", str(out)).returncode == 0
    assert run_cli("status", str(out), "--failed").stdout == ""
    again = run_cli("render", config, "--redo", "failed", "--quiet")
    assert "rendered 0 video(s)" in again.stdout


def test_status_of_a_path_that_holds_no_output_fails_in_one_line(tmp_path):
    result = run_cli("status", str(tmp_path / "out" / "dmeo"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"reelfarm: {tmp_path}/out/dmeo holds no reelfarm output "
                                     "(no job.json, no manifests/): check the path")
    table = pa.table({"x": [1]})
    pq.write_table(table, tmp_path / "stray.parquet")
    assert run_cli("status", str(tmp_path)).returncode == 1
    assert os.path.exists(tmp_path / "stray.parquet")


def test_a_second_driver_on_a_live_output_is_refused_at_once(tmp_path, place):
    import time

    out = f"{place}/busy"
    config = write_config(tmp_path, rows=prompts(12), output_uri=out, cluster=INLINE,
                          render={"num_inference_steps": 8})
    with CliDriver("render", config, "--quiet") as first:
        fs, root = fsspec.core.url_to_fs(out)

        def running() -> bool:
            fs.invalidate_cache()
            return fs.exists(f"{root}/job.json")

        wait_for(running, 120, "the first run to start", first)
        started = time.monotonic()
        second = run_cli("render", config, "--quiet")
        refused_s = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second could be refused"
        assert second.returncode == 1
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert f"is in use by another reelfarm run (host {os.uname().nodename}, " \
               f"pid {first.pid}, since " in message
        assert first.wait(timeout=300) == 0, first.communicate()
    assert refused_s < 15
    assert run_cli("verify", out).returncode == 0
    assert len(by_id(read_manifest(out))) == 12
    rerun = run_cli("render", config, "--quiet")  # the lease was released: no wait
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout


def test_status_and_the_report_read_manifest_parquet_only_while_it_holds_every_commit(tmp_path):
    """One object instead of a shard manifest each, but never a stale one: a commit made after
    the consolidation (a repair, a resumed run) sends the readers back to the shards."""
    from helpers import committed_output

    from jobs.products.report.gather import gather
    from jobs.status import status

    out = str(tmp_path / "out")
    rows = committed_output(out, 6, shard_size=2)
    assert not manifest.consolidated_is_current(out)  # none written yet
    manifest.consolidate(out)
    assert manifest.consolidated_is_current(out)
    for path in manifest.committed(out).shards:  # what is read now is manifest.parquet alone
        os.rename(path, path + ".aside")
    assert status(out, must_exist=False)["rows"] == 6 and gather(out).rows == 6
    for name in os.listdir(f"{out}/manifests"):  # back
        os.rename(f"{out}/manifests/{name}", f"{out}/manifests/{name[:-len('.aside')]}")
    manifest.write_shard(out, [{**rows[0], "id": "later", "row_index": 6}])
    assert not manifest.consolidated_is_current(out)
    assert status(out)["rows"] == 7 and gather(out).rows == 7


def test_a_manifest_parquet_written_before_a_column_existed_reads_it_as_nulls(tmp_path):
    from helpers import committed_output

    out = str(tmp_path / "out")
    committed_output(out, 4, shard_size=2)
    manifest.consolidate(out)
    path = f"{out}/manifest.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["stages", "quality_tries"]), path)
    (table,) = manifest.iter_consolidated(out, ["id", "stages", "quality_tries"])
    assert table.column_names == ["id", "stages", "quality_tries"]
    assert table["stages"].null_count == 4 and manifest.tally(out).rows == 4
