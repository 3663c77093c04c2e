"""``verify`` finds each kind of inconsistency in an output, reading it a shard at a time."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import committed_output, prompts, tiny_config, write_prompts

from jobs.verify import rows_to_redo, unlisted_artifacts, verify
from jobs.config import validate
from jobs.driver import render
from jobs.store import manifest


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


def test_what_the_folder_listings_show(tmp_path):
    """Existence and sizes come from one listing of each artifact folder: a deleted and a cut
    video are still found by verify, a repair and the _SUCCESS check alike, a corrupted one by
    its hash; strays and leftovers too. An object a row keeps outside those folders is asked
    for itself."""
    out = tmp_path / "out"
    rows = committed_output(str(out), 20, shard_size=8)
    (out / rows[3]["video_uri"]).unlink()
    (out / rows[4]["video_uri"]).write_bytes(b"cut")
    (out / rows[5]["video_uri"]).write_bytes(b"x" * rows[5]["bytes"])
    kept = [{**rows[0], "id": f"kept-{n}", "row_index": 20 + n,
             "artifacts": [{**rows[0]["artifacts"][0], "path": f"kept/{n}.mp4"}]} for n in (0, 1)]
    (out / "kept").mkdir()
    (out / "kept" / "0.mp4").write_bytes((out / rows[0]["video_uri"]).read_bytes())
    manifest.write_shard(str(out), kept)
    (out / "videos" / "stranger.mp4").write_bytes(b"not ours")
    (out / "stages" / "keyframe").mkdir(parents=True)
    (out / "stages" / "keyframe" / "orphan.png").write_bytes(b"not ours")
    (out / "previews").mkdir()
    (out / "previews" / ".row-00001.gif.tmp-1").write_bytes(b"half")

    audit = verify(str(out))
    damaged = [f"video of row 'row-00003' is missing: {out}/videos/row-00003.mp4",
               f"video of row 'row-00004' has 3 bytes, manifest says {rows[4]['bytes']}: "
               f"{out}/videos/row-00004.mp4",
               f"video of row 'row-00005' does not match its sha256: {out}/videos/row-00005.mp4",
               f"video of row 'kept-1' is missing: {out}/kept/1.mp4"]
    strays = [f"{out}/previews/.row-00001.gif.tmp-1", f"{out}/stages/keyframe/orphan.png",
              f"{out}/videos/stranger.mp4"]
    assert sorted(audit.problems) == sorted([
        *damaged, f"leftover temporary object {strays[0]}",
        f"object {strays[1]} is not in any manifest", f"video {strays[2]} is not in any manifest"])
    assert sorted(audit.strays) == strays
    assert sorted(verify(str(out), check_hashes=False).problems) == sorted(
        problem for problem in audit.problems if "sha256" not in problem)
    assert sorted(r["id"] for r in rows_to_redo(str(out), False, True).values()) == [
        "kept-1", "row-00003", "row-00004", "row-00005"]
    manifest.consolidate(str(out))
    assert unlisted_artifacts(str(out))[0] == 3  # of the right size, row-00005 is listed
