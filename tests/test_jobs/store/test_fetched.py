"""Each committed manifest object is fetched once a command, however many of its readers ask,
and fetched again once it is listed otherwise (rewritten under its name)."""

from __future__ import annotations

from collections import Counter

from fsspec.implementations.local import LocalFileSystem
from helpers import committed_output, s3_requests

from jobs.cli import main
from jobs.store import fetched, manifest, segments
from rendering import storage


def test_a_shard_is_fetched_once_while_it_stays_as_listed(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    rows = committed_output(out, 4, shard_size=2)
    fetches: Counter = Counter()
    cat_file = LocalFileSystem.cat_file

    def counted(self, path, *args, **kwargs):
        fetches.update([path.rsplit("/", 1)[-1]])
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", counted)

    def prompts() -> list[str]:
        return [p for t in manifest.iter_shards(out, ["prompt"]) for p in t["prompt"].to_pylist()]

    assert prompts() == prompts() == [f"scene {i}" for i in range(4)]
    assert sorted(fetches.values()) == [1, 1]  # two shards: footers and rows, read twice
    # The same rows committed again under the shard's name (as harmless as ever): a new object.
    path, _ = manifest.write_shard(out, [{**row, "prompt": "again"} for row in rows[2:]])
    assert prompts() == ["scene 0", "scene 1", "again", "again"]
    assert fetches[path.rsplit("/", 1)[-1]] == 2 and sorted(fetches.values()) == [1, 2]


def test_status_verify_and_the_report_fetch_each_object_once_on_s3(s3_bucket, capsys):
    """Live shards are decoded for their footers, then for their rows; the report asks which
    columns the manifests hold, then reads them; each reader reads the newest checkpoint: one
    GET of each object a command."""
    bucket, _ = s3_bucket
    out = f"s3://{bucket}/out/once"
    rows = committed_output(out, 40, shard_size=4)
    segments.Folder(out, 4).fold_listed()  # 10 shards into 3 segments, not deleted yet
    for start in range(40, 52, 4):  # 3 shards committed since: live
        manifest.write_shard(out, [{**row, "id": f"more-{row['row_index'] + start}",
                                    "row_index": row["row_index"] + start}
                                   for row in rows[:4]])
    fs, _ = storage.filesystem(out)
    made = s3_requests(fs)
    for command in (["status", out], ["verify", out, "--no-hash"], ["report", out]):
        fetched.clear()  # as a command of its own, in its own process
        made.clear()
        assert main(command) == 0
        gets = Counter(path.rsplit("/", 1)[-1] for operation, path in made
                       if operation == "GetObject" and "/manifests/" in path)
        assert sum(name.startswith("shard-") for name in gets) == 3, command
        assert sum(name.startswith("_checkpoint-") for name in gets) == 1, command
        assert set(gets.values()) == {1}, (command, gets)
    capsys.readouterr()
