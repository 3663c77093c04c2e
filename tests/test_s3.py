"""A real S3 endpoint (moto's server on 127.0.0.1): prompts read from it, videos and manifests
written to it and read back by a second client (boto3), and an endpoint that goes away."""

from __future__ import annotations

import io
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli, s3_client, tiny_config
from helpers import write_config
from tcp_proxy import TcpProxy
from videos import probe

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render
from rendering import storage

BUCKET = "reelfarm-test"


@pytest.fixture
def proxied(moto_server, s3_env):
    """The endpoint behind a TCP proxy the test can cut: (proxy, boto3 client, bucket made)."""
    proxy = TcpProxy(moto_server)
    proxy.up()
    s3_env(proxy.port)
    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    yield proxy, client
    proxy.down()





def _put_prompts(client, key: str, rows: list[dict]) -> str:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    client.put_object(Bucket=BUCKET, Key=key, Body=sink.getvalue())
    return f"s3://{BUCKET}/{key}"


def _objects(client, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_render_from_and_to_s3_on_ray_and_read_back_with_boto3(tmp_path, moto_server, s3_env):
    env = s3_env(moto_server)
    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    src = _put_prompts(client, "in/prompts.parquet", prompts(5))
    config = write_config(tmp_path, tiny_config(src, f"s3://{BUCKET}/out/run-1",
                                                output={"webdataset": {"rows_per_shard": 2}}))

    result = run_cli("render", str(config), "--quiet", env=env)
    assert result.returncode == 0, result.stderr

    videos = _objects(client, "out/run-1/videos/")
    assert len(videos) == 5 and all(k.endswith(".mp4") for k in videos)
    body = client.get_object(Bucket=BUCKET, Key="out/run-1/manifest.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(5)]
    for row in rows:
        key = f"out/run-1/{row['video_uri']}"
        assert videos[key] == row["bytes"]
        local = tmp_path / "check.mp4"
        local.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert probe(str(local))["frames"] == row["num_frames"]
    assert "_SUCCESS" in {k.rsplit("/", 1)[-1] for k in _objects(client, "out/run-1/")}
    assert not _objects(client, "out/run-1/receipts/")
    shards = _objects(client, "out/run-1/shards/")  # rows 0-1, 2-3, 4: packed as the job ran
    assert sorted(k.rsplit("/", 1)[-1] for k in shards) == sorted(
        f"{n:05d}.{ext}" for n in range(3) for ext in ("tar", "parquet", "done"))
    check = run_cli("verify", f"s3://{BUCKET}/out/run-1", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    client.put_object(Bucket=BUCKET, Key="out/run-1/videos/stranger.mp4", Body=b"x")
    client.put_object(Bucket=BUCKET, Key="out/run-1/manifests/.tmp-shard", Body=b"x")
    check = run_cli("verify", f"s3://{BUCKET}/out/run-1", env=env)
    assert check.returncode == 1
    assert f"FAIL leftover temporary object {BUCKET}/out/run-1/manifests/.tmp-shard" in check.stdout
    assert f"FAIL video {BUCKET}/out/run-1/videos/stranger.mp4 is not in any manifest" in check.stdout
    job = client.get_object(Bucket=BUCKET, Key="out/run-1/job.json")["Body"].read().decode()
    assert "testing-secret" not in job


def test_an_upload_cut_half_way_is_complete_or_absent(tmp_path, proxied):
    """The connection drops half way through the PUT: the key must never hold part of it."""
    proxy, client = proxied
    payload = bytes(range(256)) * 8192  # 2 MiB: one PUT
    source = tmp_path / "video.mp4"
    source.write_bytes(payload)
    fs, path = storage.filesystem(f"s3://{BUCKET}/out/videos/clip.mp4")
    for _ in range(3):
        proxy.cut_next_upload(after_bytes=len(payload) // 2)
        try:
            storage.upload_file(str(source), fs, path)  # s3fs may retry the request itself
        except Exception:  # noqa: BLE001 - absent is a correct outcome
            pass
        stored = _objects(client, "out/")
        assert stored in ({}, {"out/videos/clip.mp4": len(payload)})
        if stored:
            body = client.get_object(Bucket=BUCKET, Key="out/videos/clip.mp4")["Body"].read()
            assert body == payload
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "out/videos/clip.mp4"}]})
    assert proxy.cuts == 3


def test_the_endpoint_goes_away_mid_job_and_comes_back(tmp_path, proxied):
    proxy, client = proxied
    src = _put_prompts(client, "in/prompts.parquet", prompts(16))
    out = f"s3://{BUCKET}/out/flaky"
    cfg = validate(tiny_config(src, out, output={"shard_size": 2},
                               render={"batch_size": 1}, cluster={"backend": "inline"}))
    outcome = {}

    def run():
        try:
            outcome["summary"] = render(cfg, progress=False)
        except Exception as exc:  # noqa: BLE001 - a clean stop is allowed; see below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not _objects(client, "out/flaky/manifests/"):
        assert time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.2)
    proxy.down()
    outage_started = time.monotonic()
    time.sleep(6)
    proxy.up()
    thread.join(300)
    assert not thread.is_alive()
    lost_s = time.monotonic() - outage_started
    if "error" in outcome:  # stopped cleanly: the same command resumes it
        outcome["summary"] = render(cfg, progress=False)
    summary = outcome["summary"]
    assert (summary.ok, summary.failed, summary.complete) == (16, 0, True)

    videos = _objects(client, "out/flaky/videos/")
    manifest = pq.read_table(io.BytesIO(client.get_object(
        Bucket=BUCKET, Key="out/flaky/manifest.parquet")["Body"].read())).to_pylist()
    assert {f"out/flaky/{r['video_uri']}": r["bytes"] for r in manifest} == videos
    assert verify(out).problems == []
    print(f"S3 outage of 6 s: job done {lost_s:.1f} s after it began; "
          f"stopped and resumed: {'error' in outcome}")


def test_verify_lists_each_folder_rather_than_asking_per_row(s3_bucket):
    """At millions of rows a request per artifact is millions of requests: verify's requests
    must not grow with the rows (existence and sizes come from listings), and still find a
    deleted and a truncated video; hashing reads each object but asks nothing more of it."""
    from collections import Counter

    from helpers import committed_output, s3_requests

    from jobs.store import fetched

    _, client = s3_bucket
    out = f"s3://{BUCKET}/out/listed"
    rows = committed_output(out, 200)
    client.delete_object(Bucket=BUCKET, Key=f"out/listed/{rows[7]['video_uri']}")
    client.put_object(Bucket=BUCKET, Key=f"out/listed/{rows[9]['video_uri']}", Body=b"cut")
    fs, _ = storage.filesystem(out)
    fs.ls(BUCKET)  # the client exists once a request was made
    made = s3_requests(fs)

    videos = f"s3://{BUCKET}/out/listed/videos"
    expected = [f"video of row 'row-00007' is missing: {videos}/row-00007.mp4",
                f"video of row 'row-00009' has 3 bytes, manifest says {rows[9]['bytes']}: "
                f"{videos}/row-00009.mp4"]
    assert verify(out, check_hashes=False).problems == expected
    plain = Counter(operation for operation, _ in made)
    print(f"verify of {len(rows)} rows on S3: {plain.total()} requests {dict(plain)}")
    assert plain.total() < 30

    made.clear()
    fetched.clear()  # a command of its own: its manifests are fetched again
    assert verify(out).problems == expected
    calls = Counter(operation for operation, _ in made)
    print(f"... hashing: {calls.total()} requests {dict(calls)}")
    assert calls - plain == Counter(GetObject=len(rows) - 2) and not plain - calls


def test_manifest_parquet_is_read_alone_only_once_it_is_newer_than_every_shard(s3_bucket):
    """S3 stamps objects to the second: a consolidation in the second of a commit is a tie, and
    a tie sends the readers to the shards."""
    from helpers import committed_output

    from jobs.store import manifest

    out = f"s3://{BUCKET}/out/stamped"
    rows = committed_output(out, 4, shard_size=2)
    time.sleep(1.1)
    manifest.consolidate(out)
    assert manifest.consolidated_is_current(out)
    time.sleep(1.1)
    manifest.write_shard(out, [{**rows[0], "id": "later", "row_index": 4}])
    assert not manifest.consolidated_is_current(out) and manifest.tally(out).rows == 5
def test_a_folded_output_is_read_in_a_few_requests_and_its_absorbed_shards_once(s3_bucket,
                                                                             monkeypatch):
    """On S3 each shard manifest is a request: folded, "what is done" is a listing, the
    checkpoint and its segments. A fold cut before its checkpoint is not seen; absorbed shards
    not yet deleted are known by their listing (size, LastModified) and skipped; once deleted,
    reads are the same."""
    from helpers import committed_output, crash_at_checkpoint, s3_requests

    from jobs.store import fetched, manifest, segments

    out = f"s3://{BUCKET}/out/folded"
    committed_output(out, 400, shard_size=4)
    fs, _ = storage.filesystem(out)
    made = s3_requests(fs)

    def reads() -> tuple:
        made.clear()
        fetched.clear()  # as in a new process
        state = (len(manifest.committed_hashes(out)), manifest.tally(out).rows,
                 [r for t in manifest.iter_shards(out, ["id"]) for r in t["id"].to_pylist()])
        return state, len(made)

    before, shard_requests = reads()
    assert before[:2] == (400, 400) and len(before[2]) == 400
    # A fold that dies between its segment and its checkpoint changes nothing readers see.
    undo = crash_at_checkpoint(monkeypatch)
    with pytest.raises(PermissionError):
        segments.Folder(out, 50).fold_listed()
    undo()
    assert reads()[0] == before
    segments.Folder(out, 50).fold_listed()
    during, folded_requests = reads()
    monkeypatch.setattr(segments, "RETENTION_S", 0.0)
    segments.Folder(out, 50).fold_listed()
    assert not [p for p in fs.ls(f"{BUCKET}/out/folded/manifests") if "/shard-" in p]
    after, deleted_requests = reads()
    print(f"three readers of 400 rows in 100 shards on S3: {shard_requests} requests; folded "
          f"into 2 segments: {folded_requests} (absorbed shards still there), "
          f"{deleted_requests} (deleted)")
    assert during == after == before
    assert deleted_requests <= folded_requests < 20 < shard_requests
    assert verify(out).problems == []
