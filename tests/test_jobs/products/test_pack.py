"""WebDataset shards packed from a real rendered output: read back by webdataset and Hugging Face
datasets, byte-identical across renders and packing paths, never partial, packed once, resumed,
repacked after a repair or a grown input, checked, and the same on S3 (moto)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
import threading

import pyarrow.parquet as pq
import pytest
from helpers import prompts, tiny_config, write_prompts
from helpers import read_manifest

from jobs.store import layout, manifest
from jobs.config import validate
from jobs.driver import render
from jobs.products.webdataset.check import check_tars
from jobs.products.webdataset.packer import Packer
from jobs.products.webdataset.samples import RUN_FIELDS
from jobs.products.webdataset.tar_index import packed_samples, read_markers
from jobs.products.webdataset.tars import PackError, PackSpec, sample_hash, sample_key
from rendering import storage

ROWS = 11  # 9 prompts, an id with dots, a blank prompt (a failed row)
SPEC = PackSpec(rows_per_shard=4)  # shards: rows 0-3, 4-7, 8-10
SHARDS = [f"{n:05d}" for n in range(3)]


def _rows(extra: int = 0) -> list[dict]:
    rows = prompts(9) + [{"id": "clip.v1.final", "prompt": "a dotted id"},
                         {"id": "blank", "prompt": "   "}] + prompts(extra, prefix="more")
    return [{**r, "lang": "en"} for r in rows]


def _render(folder, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    src = write_prompts(folder / "prompts.parquet", rows)
    out = str(folder / "out")
    render(validate(tiny_config(src, out, cluster={"backend": "inline"},
                                input={"carry_columns": ["lang"]})), progress=False)
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> str:
    return _render(tmp_path_factory.mktemp("render-a"), _rows())


@pytest.fixture
def out(rendered, tmp_path) -> str:
    """A fresh copy of the rendered output, for a test to pack and damage."""
    return str(shutil.copytree(rendered, tmp_path / "out"))


def _pack(output: str, spec: PackSpec = SPEC, total_rows: int = ROWS) -> Packer:
    packer = Packer(output, spec, total_rows)
    packer.seed_from_output()
    packer.close()
    return packer


def _shard_files(output: str) -> dict[str, bytes]:
    folder = os.path.join(output, layout.SHARDS_DIR)
    return {name: _read(os.path.join(folder, name))
            for name in sorted(os.listdir(folder))}


def _tars(output: str) -> list[str]:
    return [os.path.join(output, layout.SHARDS_DIR, f"{s}.tar") for s in SHARDS]


def _boom_on(monkeypatch, suffix: str, function: str = "upload_file"):
    """Make storage's ``function`` fail for paths ending in ``suffix``: a crash at that step."""
    real = getattr(storage, function)

    def failing(*args):
        if str(args[-2 if function == "write_bytes" else -1]).endswith(suffix):
            if function == "upload_file":
                assert os.path.getsize(args[0]) > 0  # the local tar was written whole
            raise PermissionError(f"simulated crash writing {suffix}")
        return real(*args)

    monkeypatch.setattr(storage, function, failing)


def test_shards_read_back_with_webdataset_and_hf_datasets(out, tmp_path, monkeypatch):
    import datasets
    import webdataset as wds

    packer = _pack(out)
    assert packer.packed == 3
    assert sorted(_shard_files(out)) == [f"{s}.{x}" for s in SHARDS
                                         for x in ("done", "parquet", "tar")]
    rows = read_manifest(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == ROWS - 1

    # webdataset: every sample decodes to the row's video, metadata and prompt, in input order.
    samples = list(wds.WebDataset(_tars(out), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(r["id"]) for r in ok]
    assert "clip_v1_final-" in samples[-1]["__key__"]  # dots are gone from keys
    for sample, row in zip(samples, ok):
        assert {k for k in sample if not k.startswith("__")} == {"json", "mp4", "txt"}
        assert sample["mp4"] == _read(os.path.join(out, row["video_uri"]))
        meta = json.loads(sample["json"])
        assert {k: meta[k] for k in ("id", "row_index", "seed", "sha256", "prompt", "lang")} == \
            {k: row[k] for k in ("id", "row_index", "seed", "sha256", "prompt", "lang")}
        assert meta["artifacts"] == row["artifacts"]
        assert not RUN_FIELDS & set(meta)
        assert sample["txt"].decode() == row["prompt"]

    # The failed row is listed in its shard's index, not packed; markers say what is there.
    index = pq.read_table(os.path.join(out, "shards", "00002.parquet")).to_pylist()
    assert [(r["id"], r["status"], r["key"]) for r in index][-1] == ("blank", "failed", None)
    marker = json.loads(_read(os.path.join(out, "shards", "00002.done")))
    assert (marker["samples"], marker["failed"], marker["first_row"], marker["end_row"]) \
        == (2, 1, 8, 11)
    assert marker["sha256"] == storage.sha256_file(_tars(out)[2])

    # Hugging Face datasets: the tars as a webdataset, the manifest and the indexes as Parquet.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf")
    ds = datasets.load_dataset("webdataset", data_files={"train": _tars(out)}, split="train",
                               cache_dir=cache)
    ds = ds.cast_column("mp4", datasets.Video(decode=False))  # bytes, no video decoder needed
    assert ds.num_rows == len(ok)
    assert [r["__key__"] for r in ds] == [s["__key__"] for s in samples]
    assert [r["mp4"]["bytes"] for r in ds] == [s["mp4"] for s in samples]
    assert [r["json"]["id"] for r in ds] == [r["id"] for r in ok]
    table = datasets.load_dataset("parquet", data_files=os.path.join(out, "manifest.parquet"),
                                  split="train", cache_dir=cache)
    indexes = datasets.load_dataset("parquet", data_files=os.path.join(out, "shards", "*.parquet"),
                                    split="train", cache_dir=cache)
    assert table.num_rows == indexes.num_rows == ROWS
    packed_ids = indexes.filter(lambda r: r["status"] == "ok")["id"]
    assert sorted(packed_ids) == sorted(r["id"] for r in ok)


def test_the_same_input_and_config_give_byte_identical_shards(rendered, out, tmp_path):
    # A second render of the same job, packed on resume (seed) ...
    again = _render(tmp_path / "render-b", _rows())
    _pack(out)
    _pack(again)
    assert _shard_files(out) == _shard_files(again)
    # ... and the same rows handed over as the scheduler would, packed during a run.
    live = _live_output(rendered, tmp_path / "live")
    packer = Packer(live, SPEC, ROWS)
    packer.seed_from_output()
    packer.add(_records(rendered))
    packer.close()
    assert _shard_files(live) == _shard_files(out)
    for name in SHARDS:
        with tarfile.open(os.path.join(out, "shards", f"{name}.tar")) as tar:
            for member in tar:
                assert (member.mtime, member.uid, member.gid, member.uname, member.gname,
                        member.mode) == (0, 0, 0, "", "", 0o644)


def test_a_crash_mid_pack_leaves_no_partial_tar_and_the_next_packer_packs_it(out, monkeypatch):
    reference = str(shutil.copytree(out, out + "-ref"))
    _pack(reference)
    # The upload of every tar fails once the local tar is written: nothing is visible.
    _boom_on(monkeypatch, ".tar")
    with pytest.raises(PermissionError, match="simulated crash"):
        _pack(out)
    assert not os.path.exists(os.path.join(out, "shards"))  # not even a temp object
    monkeypatch.undo()
    # A crash after the tar and index are published, before the marker: not packed yet.
    _boom_on(monkeypatch, ".done", "write_bytes")
    with pytest.raises(PermissionError):
        _pack(out)
    assert sorted(_shard_files(out)) == [f"{s}.{x}" for s in SHARDS for x in ("parquet", "tar")]
    assert any("has no marker" in p for p in check_tars(out))
    monkeypatch.undo()
    assert _pack(out).packed == 3
    assert _shard_files(out) == _shard_files(reference)
    assert check_tars(out) == []


def test_a_resume_packs_only_the_missing_shards(out, monkeypatch):
    _boom_on(monkeypatch, "00001.tar")
    with pytest.raises(PermissionError):
        _pack(out)
    monkeypatch.undo()
    folder = os.path.join(out, "shards")
    assert sorted(os.listdir(folder)) == [f"{s}.{x}" for s in ("00000", "00002")
                                          for x in ("done", "parquet", "tar")]
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    packer = _pack(out)
    assert (packer.packed, packer.already_packed) == (1, 2)
    assert {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in before} == before
    assert _pack(out).packed == 0  # everything packed: a further run writes nothing
    assert check_tars(out) == []
    # A shard whose tar went missing under its marker is packed again, to the same bytes.
    files = _shard_files(out)
    os.remove(os.path.join(folder, "00000.tar"))
    assert _pack(out).packed == 1
    assert _shard_files(out) == files


def test_a_damaged_video_is_never_packed_and_other_settings_are_refused(out):
    row = next(r for r in read_manifest(out) if r["row_index"] == 5)
    with open(os.path.join(out, row["video_uri"]), "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 8)
    with pytest.raises(PackError, match="does not match its manifest.*--redo damaged"):
        _pack(out)
    assert sorted(read_markers(out)) == [0, 2]
    with pytest.raises(PackError, match="rows_per_shard=4, this job asks for 5"):
        Packer(out, PackSpec(rows_per_shard=5), ROWS).seed_from_output()


def test_an_interrupted_run_leaves_queued_shards_to_the_next_one(out, monkeypatch):
    release = threading.Event()
    real = storage.upload_file

    def slow(local, fs, path):
        release.wait(30)
        return real(local, fs, path)

    monkeypatch.setattr(storage, "upload_file", slow)
    threading.Timer(0.3, release.set).start()
    with pytest.raises(KeyboardInterrupt):
        with Packer(out, SPEC, ROWS) as packer:
            packer.seed_from_output()  # shard 0 is being written, shards 1 and 2 wait
            raise KeyboardInterrupt
    assert packer.packed == 1 and sorted(read_markers(out)) == [0]
    monkeypatch.undo()
    assert _pack(out).packed == 2
    assert check_tars(out) == []


def test_add_packs_each_shard_exactly_when_its_last_row_arrives(rendered, tmp_path):
    live = _live_output(rendered, tmp_path / "live")
    by_row = {r["row_index"]: r for r in _records(rendered)}
    # Commits arrive out of order across shards, as retries and parallel workers make them.
    batches = [[9, 10], [0, 5], [1, 2], [8], [4, 6], [3], [7]]
    complete_after = [set(), set(), set(), {2}, {2}, {0, 2}, {0, 1, 2}]
    packer = Packer(live, SPEC, ROWS)
    packer.seed_from_output()
    added: set[int] = set()
    for batch, expected in zip(batches, complete_after):
        packer.add([by_row[i] for i in batch])
        packer.flush()
        assert set(read_markers(live)) == expected
        added.update(batch)
        assert packer.pending_rows == len([i for i in added if i // 4 not in expected])
    packer.close()
    assert packer.packed == 3
    assert check_tars(live) == []


def test_keep_videos_false_drops_packed_videos_and_check_tars_catches_damage(rendered, out):
    rows = read_manifest(out)
    ok = [r for r in rows if r["status"] == "ok"]
    _pack(out, PackSpec(4, keep_videos=False))
    assert os.listdir(os.path.join(out, "videos")) == []
    assert check_tars(out) == []
    found = packed_samples(out)
    assert found.contains([sample_hash(r["id"], r["occurrence"], r["sha256"]) for r in ok]).all()
    # A resume with the loose videos gone packs nothing again (the rows are still committed);
    # one the deletions missed (a crash right after the marker) is deleted then.
    last = os.path.join(out, ok[3]["video_uri"])
    shutil.copyfile(os.path.join(rendered, ok[3]["video_uri"]), last)
    assert _pack(out, PackSpec(4, keep_videos=False)).packed == 0
    assert not os.path.exists(last)

    folder = os.path.join(out, "shards")
    tar = os.path.join(folder, "00000.tar")
    original = _read(tar)
    tampered = bytearray(original)
    tampered[3000] ^= 0xFF  # inside the first video's bytes
    _write(tar, bytes(tampered))
    problems = check_tars(out)
    assert any("00000.tar" in p and "sha256" in p for p in problems)
    assert any("does not match the index" in p for p in problems)
    _write(tar, original)

    os.remove(os.path.join(folder, "00001.tar"))
    assert "shards/00001.tar is missing (its marker is there)" in check_tars(out)

    index = os.path.join(folder, "00002.parquet")
    table = pq.read_table(index)
    pq.write_table(table.slice(1), index)  # drop row 8 from the index
    problems = check_tars(out)
    assert any("not in its index" in p for p in problems)
    assert any("does not list exactly rows 8..10" in p for p in problems)
    assert any(f"row {ok[8]['id']!r} is ok but shard 00002" in p for p in problems)


def test_a_grown_input_and_a_repair_repack_only_the_shards_they_change(rendered, out, tmp_path):
    spec = PackSpec(4, keep_videos=False)
    _pack(out, spec)
    folder = os.path.join(out, "shards")
    first = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    # Two rows more in the input: shard 2's range grows to 8-11, shard 3 is new. Shard 2's old
    # samples have no loose videos any more: they come from its previous tar.
    src = write_prompts(tmp_path / "grown.parquet", _rows(extra=2))
    render(validate(tiny_config(src, out, cluster={"backend": "inline"},
                                input={"carry_columns": ["lang"]})), progress=False)
    packer = _pack(out, spec, ROWS + 2)
    assert (packer.packed, packer.already_packed) == (2, 2)
    for name in ("00000", "00001"):
        assert os.stat(os.path.join(folder, f"{name}.done")).st_mtime_ns == first[f"{name}.done"]
    assert check_tars(out, total_rows=ROWS + 2) == []
    marker = json.loads(_read(os.path.join(folder, "00002.done")))
    assert (marker["samples"], marker["first_row"], marker["end_row"]) == (3, 8, 12)

    # A repair commits a new record for row 1 (here: it now failed) while a run is packing:
    # close() finds shard 0 changed and packs it again, the others stay as they are.
    stale = next(r for r in _records(out) if r["row_index"] == 1)
    repaired = {**stale, "status": "failed", "error_code": "render_error", "error": "x",
                "redo_of": stale["committed_at"], "artifacts": [], "video_uri": None,
                "bytes": None, "sha256": None}
    packer = Packer(out, spec, ROWS + 2)
    packer.seed_from_output()
    manifest.write_shard(out, [repaired])
    packer.add([repaired])
    packer.close()
    assert packer.packed == 1
    index = pq.read_table(os.path.join(folder, "00000.parquet")).to_pylist()
    assert [r["status"] for r in index] == ["ok", "failed", "ok", "ok"]
    assert json.loads(_read(os.path.join(folder, "00000.done")))["samples"] == 3
    assert check_tars(out, total_rows=ROWS + 2) == []


def test_shards_on_s3(rendered, out, s3_bucket, monkeypatch):
    import s3fs

    bucket, client = s3_bucket
    fs = s3fs.S3FileSystem()
    fs.put(str(rendered) + "/", f"{bucket}/out", recursive=True)
    uri = f"s3://{bucket}/out"
    # A crash uploading shard 1's tar: nothing of it is visible on the bucket.
    _boom_on(monkeypatch, "00001.tar")
    with pytest.raises(PermissionError):
        _pack(uri, PackSpec(4, keep_videos=False))
    monkeypatch.undo()
    listing = client.list_objects_v2(Bucket=bucket, Prefix="out/shards/")["Contents"]
    keys = {o["Key"] for o in listing}
    assert not any("00001" in k for k in keys)
    # The next packer packs it; the shards are those of the same output packed on local disk.
    packer = _pack(uri, PackSpec(4, keep_videos=False))
    assert (packer.packed, packer.already_packed) == (1, 2)
    assert check_tars(uri) == []
    _pack(out)
    for name, data in _shard_files(out).items():
        assert client.get_object(Bucket=bucket, Key=f"out/shards/{name}")["Body"].read() == data
    videos = client.list_objects_v2(Bucket=bucket, Prefix="out/videos/")
    assert videos.get("KeyCount", 0) == 0  # keep_videos=False: packed rows' videos are gone
    client.delete_object(Bucket=bucket, Key="out/shards/00002.tar")
    fs.invalidate_cache()
    assert "shards/00002.tar is missing (its marker is there)" in check_tars(uri)


# ---------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _records(output: str) -> list[dict]:
    """The output's committed rows as the scheduler hands them over: ``jobs.run.records.record`` dicts,
    with the carried columns as ``carry.<name>`` and the in-memory key."""
    from jobs.input.rows import output_key

    records = []
    for table in manifest.iter_shards(output):
        for row in table.to_pylist():
            rec = {k: v for k, v in row.items() if k in manifest.SCHEMA.names}
            rec.update({f"carry.{k}": v for k, v in row.items() if k not in manifest.SCHEMA.names})
            rec["key"] = output_key(row["id"]) if row["status"] == "ok" else None
            records.append(rec)
    random.Random(0).shuffle(records)
    return records


def _live_output(rendered: str, folder) -> str:
    """The output's videos without its manifests: what a packer sees at the start of a run
    before any shard is committed (records then come through ``add``)."""
    live = shutil.copytree(rendered, folder)
    shutil.rmtree(os.path.join(live, "manifests"))
    return str(live)



def test_a_job_packs_as_it_runs_and_without_loose_videos_still_verifies_and_resumes(tmp_path):
    from jobs.verify import verify

    src = write_prompts(tmp_path / "prompts.parquet", _rows())
    out = str(tmp_path / "out")
    cfg = validate(tiny_config(src, out, cluster={"backend": "inline"},
                               output={"webdataset": {"rows_per_shard": 4}, "keep_videos": False}))
    first = render(cfg, progress=False)
    assert os.listdir(os.path.join(out, "videos")) == []
    assert verify(out).problems == []
    assert len(_tars(out)) == len(SHARDS)
    again = render(cfg, progress=False)  # every row is committed: nothing renders or repacks
    assert (again.rendered, again.ok) == (0, first.ok)
    assert verify(out).problems == []
