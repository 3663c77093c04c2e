"""Shard manifests folded into segments behind a checkpoint: every reader sees each commit once,
before, during and after a fold, and a crash at any step of a fold loses and duplicates nothing."""

import json
import os

import pytest

from helpers import committed_output, crash_at_checkpoint, wait_for
from jobs.store import lease, manifest, segments
from jobs.verify import verify
from rendering import storage

ROWS, SHARD, PER_SEGMENT = 20, 2, 4


def _state(out: str) -> tuple:
    """What every reader says of an output: its rows in order, committed set, counts, verify."""
    rows = [(r["id"], r["row_index"], r["committed_at"], r["redo_of"])
            for t in manifest.iter_shards(out) for r in t.to_pylist()]
    tally = manifest.tally(out)
    return rows, len(manifest.committed_hashes(out)), tally.rows, tally.ok, verify(out).problems


def _names(out: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, "manifests")))


@pytest.fixture
def output(tmp_path) -> str:
    out = str(tmp_path / "out")
    committed_output(out, ROWS, shard_size=SHARD)
    return out


def test_a_fold_leaves_every_reader_seeing_the_same_rows_from_a_few_objects(output, monkeypatch):
    before = _state(output)
    assert [r[1] for r in before[0]] == list(range(ROWS)) and before[1:] == (ROWS, ROWS, ROWS, [])
    monkeypatch.setattr(segments, "RETENTION_S", 0.0)
    folder = segments.Folder(output, PER_SEGMENT)
    assert folder.fold_listed() == ROWS // SHARD
    assert _state(output) == before
    names = _names(output)
    assert [n[:len("segment-00000001")] for n in names if n.startswith("segment-")] == \
        [f"segment-{g:08d}" for g in (1, 2, 3)]  # 4 + 4 + 2 shards
    assert [n for n in names if n.startswith("shard-")] == []  # absorbed, and past retention
    listed = manifest.committed(output)
    assert listed.shards == [] and len(listed.sources()[0]) == 3
    manifest.consolidate(output)
    assert [r["row_index"] for r in manifest.iter_consolidated(output, ["row_index"])
            .__next__().to_pylist()] == list(range(ROWS))


def test_shards_committed_during_a_run_fold_from_memory_in_input_order(tmp_path):
    out = str(tmp_path / "out")
    folder = segments.Folder(out, PER_SEGMENT)
    # Shards finish out of input order, as parallel workers make them.
    rows = committed_output(str(tmp_path / "rows"), 16)
    for start in (4, 0, 2, 8, 6, 10):
        folder.committed(*manifest.write_shard(out, rows[start:start + 2]))
    assert folder.folded == 4  # one segment of 4 shards, 2 committed since
    listed = manifest.committed(out)
    assert len(listed.shards) == 2 and len(listed.checkpoint["segments"]) == 1
    # The segment's rows 0..9 overlap the live shard of rows 6..7: read back in input order.
    assert [r["row_index"] for t in manifest.iter_shards(out) for r in t.to_pylist()] == \
        list(range(12))
    # The run's end folds what is listed, the 2 shards it holds among them, once.
    for start in (12, 14):  # left by another run
        manifest.write_shard(out, rows[start:start + 2])
    assert folder.fold_listed() == 4
    folder.fold()
    assert folder.folded == 8 and manifest.committed(out).shards == []
    assert [r["row_index"] for t in manifest.iter_shards(out) for r in t.to_pylist()] == \
        list(range(16))


def test_a_crash_between_the_segment_and_the_checkpoint_loses_and_duplicates_nothing(
        output, monkeypatch):
    before = _state(output)
    undo = crash_at_checkpoint(monkeypatch)
    with pytest.raises(PermissionError):
        segments.Folder(output, PER_SEGMENT).fold_listed()
    [crashed] = [n for n in _names(output) if n.startswith("segment-00000001-")]
    assert _state(output) == before  # named by no checkpoint: not read
    undo()
    segments.Folder(output, PER_SEGMENT).fold_listed()  # writes generation 1 again
    assert _state(output) == before
    assert crashed not in _names(output)  # no checkpoint can name it now: deleted


def test_a_crash_before_the_absorbed_shards_are_deleted_reads_them_once(output, monkeypatch):
    before = _state(output)
    segments.Folder(output, PER_SEGMENT).fold_listed()  # retention: the shards stay a while
    assert len([n for n in _names(output) if n.startswith("shard-")]) == ROWS // SHARD
    assert manifest.committed(output).shards == [] and _state(output) == before
    # A copy of the output stamps every object anew: absorbed shards are known by their rows.
    for name in _names(output):
        os.utime(os.path.join(output, "manifests", name), (1, 1))
    assert manifest.committed(output).shards == [] and _state(output) == before
    # Past retention, the next run's fold deletes them; nothing is read twice or lost.
    monkeypatch.setattr(segments, "RETENTION_S", 0.0)
    assert segments.Folder(output, PER_SEGMENT).fold_listed() == 0
    assert not [n for n in _names(output) if n.startswith("shard-")]
    assert _state(output) == before


def test_a_repair_committed_under_an_absorbed_shards_name_is_read(output):
    """A shard's name is a digest of its rows' keys: a repair of exactly a folded shard's rows
    commits under the name of a shard the checkpoint absorbed, and must not be skipped."""
    segments.Folder(output, PER_SEGMENT).fold_listed()
    rows = manifest.iter_shards(output).__next__().to_pylist()[:SHARD]
    repaired = [{**r, "redo_of": r["committed_at"], "prompt": "again"} for r in rows]
    path, _ = manifest.write_shard(output, repaired)
    assert path in manifest.committed(output).shards
    current = {r["id"]: r for t in manifest.iter_shards(output) for r in t.to_pylist()}
    assert len(current) == ROWS and [current[r["id"]]["prompt"] for r in rows] == ["again"] * 2
    history = [r for t in manifest.iter_shards(output, current=False) for r in t.to_pylist()]
    assert len(history) == ROWS + SHARD
    assert verify(output).problems == []


def test_a_running_jobs_counts_are_the_checkpoints_and_the_shards_committed_since(output):
    """No segment is read for the counts (status of a running job) until a repair is folded:
    its replaced commit would be counted too, so then every row is read."""
    failed = {"occurrence": 0, "prompt": "p", "status": "failed", "error_code": "invalid_prompt",
              "error": "the prompt is empty"}
    manifest.write_shard(output, [{**failed, "id": "bad-0", "row_index": ROWS}])
    expected = manifest.tally(output).to_json()  # every shard read
    segments.Folder(output, PER_SEGMENT).fold_listed()  # all 11 shards, into 3 segments
    manifest.write_shard(output, [{**failed, "id": "bad-1", "row_index": ROWS + 1}])
    expected["rows"] += 1
    expected["by_status"]["failed"] += 1
    expected["errors"]["invalid_prompt"] += 1
    assert manifest.tally(output).to_json() == expected
    # Counts read from the checkpoint, not the segments: edited, they show.
    path = sorted(p for p in _names(output) if p.startswith("_checkpoint-"))[-1]
    path = os.path.join(output, "manifests", path)
    checkpoint = json.loads(open(path).read())
    checkpoint["tally"]["by_status"]["ok"] += 1000
    open(path, "w").write(json.dumps(checkpoint))
    assert manifest.tally(output).by_status["ok"] == expected["by_status"]["ok"] + 1000
    # A live repair would be counted beside the commit it replaces: the rows are read instead.
    row = manifest.iter_shards(output).__next__().to_pylist()[0]
    manifest.write_shard(output, [{**row, "redo_of": row["committed_at"]}])
    assert manifest.tally(output).to_json() == expected


def test_a_run_that_lost_its_lease_folds_nothing(output, monkeypatch):
    """A run whose lease went unrenewed (its storage unreachable, or it stalled) past its ttl
    is taken over: its commits in flight may still land, but no fold of it writes anything."""
    monkeypatch.setattr(lease, "CLOCK_SKEW_S", 0.0)
    stalled = lease.acquire(output, ttl_s=0.5, heartbeat_s=0.1)
    folder = segments.Folder(output, PER_SEGMENT, held=stalled.check)

    def unreachable(*args):
        raise OSError("storage unreachable")

    overwrite = lease._overwrite
    monkeypatch.setattr(lease, "_overwrite", unreachable)
    wait_for(lambda: stalled.lost, 5, "the lease to go unrenewed")
    monkeypatch.setattr(lease, "_overwrite", overwrite)
    with lease.acquire(output):  # the next run holds the output
        before = _names(output)
        with pytest.raises(lease.LeaseError, match="lost its lease"):
            folder.fold_listed()
        rows = [r for t in manifest.iter_shards(output) for r in t.to_pylist()]
        with pytest.raises(lease.LeaseError, match="lost its lease"):
            for start in range(0, PER_SEGMENT * SHARD, SHARD):  # its last commits land
                folder.committed(*manifest.write_shard(output, [
                    {**row, "id": f"late-{row['id']}", "row_index": ROWS + row["row_index"]}
                    for row in rows[start:start + SHARD]]))
        assert [n for n in _names(output) if n not in before] == \
            [n for n in _names(output) if n.startswith("shard-") and n not in before]
        assert folder.folded == 0 and len(manifest.committed_hashes(output)) == ROWS + 8
    stalled.release()


def test_of_two_folds_of_a_generation_one_writes_its_checkpoint_and_the_other_stops(
        output, monkeypatch):
    """A holder that lost its lease inside a fold, after its last check, races the next
    holder's fold: the checkpoint of a generation is created once, so the late fold stops
    before it deletes anything; its segment, which no checkpoint can name, is deleted by the
    next holder's fold; every reader sees each commit once."""
    before = _state(output)
    create = storage.create_bytes
    raced = []

    def next_holder_first(fs, path, data):
        if not raced:  # the late fold's checkpoint: the next holder folds everything first
            raced.append(path)
            segments.Folder(output, PER_SEGMENT).fold_listed()
        create(fs, path, data)

    monkeypatch.setattr(storage, "create_bytes", next_holder_first)
    with pytest.raises(lease.LeaseError, match="another run folded"):
        segments.Folder(output, PER_SEGMENT).fold_listed()
    monkeypatch.undo()
    assert raced[0].endswith("_checkpoint-00000001.json") and _state(output) == before
    named = [s["name"] for s in manifest.committed(output).checkpoint["segments"]]
    assert sorted(n for n in _names(output) if n.startswith("segment-")) == named
    assert len(named) == 3 and manifest.committed(output).checkpoint["generation"] == 3
