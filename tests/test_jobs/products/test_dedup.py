"""Embeddings kept and near-duplicates found, on a real scored output (tiny:modelscope scored by
tiny:clip): the embedding round-trips through the manifest and the WebDataset tars, and
``reelfarm dedup`` finds the rows rendered twice under other ids, on local disk and on S3."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import by_id, read_manifest, run_cli, stored, tiny_config, write_prompts

from jobs.config import validate
from jobs.driver import render
from jobs.products import nearest
from jobs.products.dedup import DedupError, dedup, find_duplicates
from jobs.products.nearest import nearest_earlier
from jobs.products.webdataset.check import check_tars
from jobs.products.webdataset.packer import pack_output
from jobs.products.webdataset.tar_index import read_index, read_markers
from jobs.products.webdataset.tars import PackSpec
from jobs.store import manifest
from jobs.store.layout import DUPLICATES_FILE, REPORT_FILE
from jobs.verify import verify
from rendering import storage
from jobs.products.webdataset.tars import sample_key
from rendering.scoring import save_tiny_clip

DISTINCT = ["a cat", "m", "x", "a dog", "q", "a red fox", "a boat at sea", "rain"]
# The same prompt and seed as an earlier row, under another id: the same video again.
PLANTED = {"again-r1": "r1", "again-r4": "r4", "again-again-r1": "r1"}


def _rows() -> list[dict]:
    rows = [{"id": f"r{i}", "prompt": p, "seed": 1000 + i} for i, p in enumerate(DISTINCT)]
    for new, old in PLANTED.items():
        rows.append({**next(r for r in rows if r["id"] == old), "id": new})
    return rows


THRESHOLD = 0.998  # the planted copies are closer, every distinct pair is not (checked below)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup")
    write_prompts(folder / "prompts.parquet", _rows())
    save_tiny_clip(str(folder / "clip"), initializer_factor=5.0)  # tells renders apart
    return folder


def _config(inputs, out: str, webdataset: dict | None, **quality) -> dict:
    """The job, with ``output.webdataset`` set to ``webdataset`` (none: no tars)."""
    return validate(tiny_config(str(inputs / "prompts.parquet"), str(out),
                                cluster={"backend": "inline"},
                                quality={"clip_model": str(inputs / "clip"), **quality},
                                output={"webdataset": webdataset}))


@pytest.fixture(scope="module")
def scored(inputs) -> str:
    out = str(inputs / "out")
    render(_config(inputs, out, {"rows_per_shard": 4}), progress=False)
    return out


@pytest.fixture(scope="module")
def skipped(inputs) -> str:
    """Rendered with dedup at the end of the run, and tars that leave duplicates out."""
    out = str(inputs / "skipped")
    render(_config(inputs, out, {"rows_per_shard": 4, "skip_duplicates": True},
                   dedup={"threshold": THRESHOLD}), progress=False)
    return out


@pytest.fixture
def out(scored, tmp_path) -> str:
    return str(shutil.copytree(scored, tmp_path / "out"))


def _duplicates(rows: list[dict]) -> dict[str, str]:
    return {r["id"]: r["duplicate_of"] for r in rows if r["duplicate_of"] is not None}


def test_the_embedding_round_trips_through_the_manifest_and_the_tars(scored):
    import webdataset as wds

    rows = read_manifest(scored)
    shards = read_manifest(scored, shards=True)
    assert all(r["status"] == "ok" and len(r["clip_embedding"]) == 32 for r in rows)
    assert pq.read_schema(os.path.join(scored, "manifest.parquet")).field(
        "clip_embedding").type.value_type == "halffloat"
    by_id = {r["id"]: r["clip_embedding"] for r in shards}
    assert {r["id"]: r["clip_embedding"] for r in rows} == by_id
    folder = os.path.join(scored, "shards")
    tars, indexes = ([os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(x)]
                     for x in (".tar", ".parquet"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [sample_key(r["id"]) for r in rows]
    for sample, row in zip(samples, rows):
        embedding = sample["clip.npy"]
        assert embedding.dtype == np.float16 and embedding.shape == (32,)
        assert embedding.tolist() == row["clip_embedding"]
        assert "clip_embedding" not in sample["json"]  # in its own member, not twice
    index = [r for path in indexes for r in pq.read_table(path).to_pylist()]
    assert [r["embeddings"] for r in index] == [r["clip_embedding"] for r in rows]


def _closest_distinct(rows: list[dict]) -> tuple[float, str]:
    """The similarity of the closest pair of distinct rows, and the later row's id."""
    embeddings = {r["id"]: np.array(r["clip_embedding"], np.float32) for r in rows}
    distinct = [f"r{i}" for i in range(len(DISTINCT))]
    return max((float(embeddings[a] @ embeddings[b]), b)
               for i, a in enumerate(distinct) for b in distinct[i + 1:])


def _samples(output: str) -> list[dict]:
    """Every sample of the output's tars, as webdataset reads them."""
    import webdataset as wds

    folder = os.path.join(output, "shards")
    tars = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".tar")]
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode())


def _index(output: str) -> list[dict]:
    fs, root = storage.filesystem(output)
    return [r for n in sorted(read_markers(output)) for r in read_index(fs, root, n).to_pylist()]


def _kept_keys(rows: list[dict], left_out) -> list[str]:
    return [sample_key(r["id"]) for r in rows if r["id"] not in left_out]


def test_dedup_finds_the_rows_rendered_twice_and_no_pair_among_distinct_rows(out):
    rows = read_manifest(out)
    closest, _ = _closest_distinct(rows)
    threshold = THRESHOLD
    assert closest < threshold  # the distinct rows are distinct at this threshold
    result = run_cli("dedup", out, "--threshold", str(threshold), "--block-rows", "3")
    assert result.returncode == 0, result.stderr
    assert f"{len(PLANTED)} of {len(rows)} ok rows are near-duplicates" in result.stdout
    table = pq.read_table(os.path.join(out, DUPLICATES_FILE)).to_pylist()
    assert {r["id"]: r["duplicate_of"] for r in table} == PLANTED
    assert all(r["similarity"] == pytest.approx(1.0, abs=1e-3) for r in table)
    assert _duplicates(read_manifest(out)) == PLANTED
    page = open(os.path.join(out, REPORT_FILE)).read()  # written again, counting them
    assert f"{len(PLANTED):,} ok rows marked <code>duplicate_of</code>" in page
    # A looser threshold marks one more (the closest distinct pair's later row); each run
    # replaces the last.
    assert dedup(out, threshold=closest - 1e-6).duplicates == len(PLANTED) + 1
    assert dedup(out, threshold=threshold).duplicates == len(PLANTED)
    with pytest.raises(DedupError, match="not a cosine"):
        dedup(out, threshold=2.0)


def test_dedup_on_s3_finds_the_same_pairs(scored, s3_bucket):
    import s3fs

    bucket, _ = s3_bucket
    s3fs.S3FileSystem().put(str(scored) + "/", f"{bucket}/out", recursive=True)
    uri = f"s3://{bucket}/out"
    found = dedup(uri, threshold=0.998, block_rows=5)
    assert (found.rows, found.duplicates) == (len(_rows()), len(PLANTED))
    assert _duplicates(read_manifest(uri)) == PLANTED


def test_blockwise_search_matches_the_whole_matrix_for_any_block_size():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[20] = x[3]  # an exact copy: its best earlier row is 3, with similarity 1
    full = x @ x.T
    expected = [int(np.argmax(full[i, :i])) for i in range(1, len(x))]
    for block in (1, 5, 16, 37, 100):
        best, similarity = nearest_earlier(x.astype(np.float16).astype(np.float32), block)
        assert best[1:].tolist() == expected and similarity[0] == -np.inf
        assert similarity[20] == pytest.approx(1.0, abs=1e-3) and best[20] == 3


def test_a_run_with_dedup_leaves_the_planted_copies_out_of_its_tars(skipped):
    rows = read_manifest(skipped)
    table = pq.read_table(os.path.join(skipped, DUPLICATES_FILE)).to_pylist()
    assert {r["id"]: r["duplicate_of"] for r in table} == PLANTED  # found after the last commit
    assert _duplicates(rows) == PLANTED  # and in the consolidated manifest
    samples = _samples(skipped)
    assert [s["__key__"] for s in samples] == _kept_keys(rows, PLANTED)
    embeddings = np.stack([s["clip.npy"].astype(np.float32) for s in samples])
    similar = embeddings @ embeddings.T
    assert similar[np.triu_indices(len(samples), 1)].max() < THRESHOLD  # no duplicate is read
    # The indexes list every row: the copies with what they duplicate, not packed.
    index = _index(skipped)
    assert [r["id"] for r in index] == [r["id"] for r in rows]
    assert {r["id"]: r["duplicate_of"] for r in index if r["duplicate_of"]} == PLANTED
    assert all(r["key"] is r["member"] is None for r in index if r["id"] in PLANTED)
    markers = read_markers(skipped).values()
    assert sum(m["samples"] for m in markers) == len(rows) - len(PLANTED)
    assert sum(m["duplicates"] for m in markers) == len(PLANTED)
    assert verify(skipped).problems == []


def test_dedup_again_packs_again_the_tars_whose_rows_it_marks(skipped, tmp_path):
    out = str(shutil.copytree(skipped, tmp_path / "out"))
    rows = read_manifest(out)
    closest, later = _closest_distinct(rows)
    markers = read_markers(out)
    # A looser threshold marks a row packed before it was known to be a duplicate.
    result = run_cli("dedup", out, "--threshold", repr(closest - 1e-6), "--search", "buckets")
    assert result.returncode == 0, result.stderr
    marked = _duplicates(read_manifest(out))
    assert set(marked) == {*PLANTED, later} and PLANTED.items() <= marked.items()
    assert [s["__key__"] for s in _samples(out)] == _kept_keys(rows, {*PLANTED, later})
    changed = {n for n, m in read_markers(out).items() if m != markers[n]}
    assert changed == {by_id(rows)[later]["row_index"] // 4}  # only its tar was packed again
    assert check_tars(out) == []


def test_consolidation_keeps_duplicate_of_until_a_repair_voids_it(inputs, skipped, tmp_path):
    out = str(shutil.copytree(skipped, tmp_path / "out"))
    manifest.consolidate(out)  # as a later run's end does
    assert _duplicates(read_manifest(out)) == PLANTED
    # r1 repaired: a new commit of it, so the verdicts on its old one (the two copies of r1
    # were judged against it) no longer hold until dedup runs again; r4's copy still does.
    Path(stored(out, by_id(read_manifest(out))["r1"])).write_bytes(b"damaged")
    render(_config(inputs, out, None), redo=frozenset({"damaged"}), progress=False)  # no dedup
    assert _duplicates(read_manifest(out)) == {"again-r4": "r4"}
    assert dedup(out, threshold=THRESHOLD).duplicates == len(PLANTED)
    assert _duplicates(read_manifest(out)) == PLANTED


def test_leaving_duplicates_out_later_puts_their_dropped_videos_back(out):
    rows = read_manifest(out)
    pack_output(out, PackSpec(4, keep_videos=False), len(rows))  # every row packed, loose gone
    assert not any(os.path.exists(stored(out, r)) for r in rows)
    find_duplicates(out, THRESHOLD)
    pack_output(out, PackSpec(4, keep_videos=False, skip_duplicates=True), len(rows))
    assert [s["__key__"] for s in _samples(out)] == _kept_keys(rows, PLANTED)
    for row in rows:  # the copies are in no tar now: their videos are back where they were
        assert os.path.exists(stored(out, row)) == (row["id"] in PLANTED)
        if row["id"] in PLANTED:
            assert storage.sha256_file(stored(out, row)) == row["sha256"]
    assert verify(out).problems == []


def test_on_s3_a_run_leaves_copies_out_and_dedup_packs_again(inputs, skipped, s3_bucket):
    bucket, _ = s3_bucket
    uri = f"s3://{bucket}/skipped"
    render(_config(inputs, uri, {"rows_per_shard": 4, "skip_duplicates": True},
                   dedup={"threshold": THRESHOLD}), progress=False)
    assert _duplicates(read_manifest(uri)) == PLANTED
    assert {r["id"]: r["duplicate_of"] for r in _index(uri) if r["duplicate_of"]} == PLANTED
    closest, later = _closest_distinct(read_manifest(skipped))  # the same renders
    assert dedup(uri, threshold=closest - 1e-6, block_rows=5).duplicates == len(PLANTED) + 1
    manifest.consolidate(uri)
    assert set(_duplicates(read_manifest(uri))) == {*PLANTED, later}
    index = _index(uri)
    assert {r["id"] for r in index if r["duplicate_of"]} == {*PLANTED, later}
    assert sum(m["samples"] for m in read_markers(uri).values()) == len(index) - len(PLANTED) - 1
    assert check_tars(uri) == []


def test_bucketed_search_probing_every_bucket_is_the_exact_search(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[rng.integers(1, 3000, 30)] = x[rng.integers(0, 1, 30)]  # copies of row 0
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    exact = nearest_earlier(x, 256)
    monkeypatch.setattr(nearest, "BUCKET_ROWS", 500)  # 6 buckets
    monkeypatch.setattr(nearest, "PROBES", 6)
    best, similarity = nearest_earlier(x, 256, "buckets")
    assert np.allclose(similarity, exact[1], atol=1e-6)
    # The same rows, but where float16 rows tie (a product may round the other way in
    # another block): there the other is as close.
    other = np.flatnonzero(best != exact[0])
    assert len(other) <= 3 and np.allclose(_dots(x, other, best[other]), exact[1][other])
    # Probing one bucket compares fewer pairs: each similarity it reports is still exact.
    monkeypatch.setattr(nearest, "PROBES", 1)
    best, similarity = nearest_earlier(x, 256, "buckets")
    compared = np.flatnonzero(np.isfinite(similarity))
    assert 0 < len(compared) < len(x) and (best[compared] < compared).all()
    assert np.allclose(similarity[compared], _dots(x, compared, best[compared]))
    assert (similarity <= exact[1] + 1e-6).all()


def _dots(x: np.ndarray, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x[rows].astype(np.float32), x[others].astype(np.float32))
