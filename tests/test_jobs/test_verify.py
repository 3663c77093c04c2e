"""``verify`` finds each kind of inconsistency in an output, reading it a shard at a time."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import prompts, tiny_config, write_prompts

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render


@pytest.fixture
def output(tmp_path):
    """A finished output of 7 rows in 2 shards, one row failed (a blank prompt)."""
    rows = prompts(7)
    rows[5]["prompt"] = "  "
    src = write_prompts(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    summary = render(validate(tiny_config(src, str(out), output={"shard_size": 4},
                                          cluster={"backend": "inline"})), progress=False)
    assert (summary.ok, summary.failed) == (6, 1)
    assert len(os.listdir(out / "manifests")) == 2
    return out


def test_a_finished_output_is_consistent(output):
    audit = verify(str(output))
    assert (audit.rows, audit.ok, audit.problems) == (7, 6, [])


def test_unlisted_videos_and_leftover_temp_objects(output):
    (output / "videos" / "stranger.mp4").write_bytes(b"not ours")
    (output / "videos" / ".tmp-upload-1").write_bytes(b"half")
    (output / "manifests" / ".tmp-shard").write_bytes(b"half")
    problems = verify(str(output)).problems
    assert problems == [
        f"leftover temporary object {output}/manifests/.tmp-shard",
        f"leftover temporary object {output}/videos/.tmp-upload-1",
        f"video {output}/videos/stranger.mp4 is not in any manifest",
    ]


def test_rows_committed_twice_across_and_within_shards(output):
    first = sorted((output / "manifests").iterdir())[0]
    shard = pq.read_table(first)
    pq.write_table(pa.concat_tables([shard, shard]), output / "manifests" / "shard-copy.parquet")
    problems = verify(str(output)).problems
    ids = shard["id"].to_pylist()
    assert sorted(p for p in problems if "committed" in p and "times" in p) == sorted(
        f"row {i!r} is committed 3 times" for i in ids)
    assert f"_SUCCESS is present but {7 + 2 * len(ids)} of 7 rows are committed" in problems


def test_success_without_the_consolidated_manifest(output):
    os.remove(output / "manifest.parquet")
    assert verify(str(output)).problems == [
        "_SUCCESS is present but manifest.parquet is missing"]


def test_an_output_with_nothing_committed(tmp_path):
    (tmp_path / "empty").mkdir()
    assert verify(str(tmp_path / "empty")).problems == [
        f"no committed shard manifests under {tmp_path / 'empty'}/manifests"]
    assert verify(str(tmp_path / "absent")).problems == [
        f"output {tmp_path / 'absent'} does not exist"]
