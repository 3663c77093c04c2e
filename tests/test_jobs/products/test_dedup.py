"""Embeddings kept and near-duplicates found, on a real scored output (tiny:modelscope scored by
tiny:clip): the embedding round-trips through the manifest and the WebDataset tars, and
``reelfarm dedup`` finds the rows rendered twice under other ids, on local disk and on S3."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import read_manifest, run_cli, tiny_config, write_prompts

from jobs.config import validate
from jobs.driver import render
from jobs.products.dedup import DUPLICATES_FILE, DedupError, dedup, nearest_earlier
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


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("dedup")
    src = write_prompts(folder / "prompts.parquet", _rows())
    out = str(folder / "out")
    save_tiny_clip(str(folder / "clip"), initializer_factor=5.0)  # tells renders apart
    render(validate(tiny_config(src, out, cluster={"backend": "inline"},
                                quality={"clip_model": str(folder / "clip")},
                                output={"webdataset": {"rows_per_shard": 4}})), progress=False)
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


def test_dedup_finds_the_rows_rendered_twice_and_no_pair_among_distinct_rows(out):
    rows = read_manifest(out)
    embeddings = {r["id"]: np.array(r["clip_embedding"], np.float32) for r in rows}
    distinct = np.stack([embeddings[f"r{i}"] for i in range(len(DISTINCT))])
    closest = max(float(a @ b) for i, a in enumerate(distinct) for b in distinct[i + 1:])
    threshold = 0.998
    assert closest < threshold  # the distinct rows are distinct at this threshold
    result = run_cli("dedup", out, "--threshold", str(threshold), "--block-rows", "3")
    assert result.returncode == 0, result.stderr
    assert f"{len(PLANTED)} of {len(rows)} ok rows are near-duplicates" in result.stdout
    table = pq.read_table(os.path.join(out, DUPLICATES_FILE)).to_pylist()
    assert {r["id"]: r["duplicate_of"] for r in table} == PLANTED
    assert all(r["similarity"] == pytest.approx(1.0, abs=1e-3) for r in table)
    assert _duplicates(read_manifest(out)) == PLANTED
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
