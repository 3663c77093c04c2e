"""A whole render, checked the way a user would: every video decoded, the manifest complete.

The same test runs on both backends: in-process and on a real local Ray cluster.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli, stored, tiny_config, write_prompts
from helpers import read_manifest
from videos import probe

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render


def _render(tmp_path, rows, backend, **sections):
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    cfg = validate(tiny_config(src, str(tmp_path / "out"), cluster={"backend": backend}, **sections))
    return cfg, render(cfg, progress=False)


@pytest.mark.parametrize("backend", ["inline", "ray"])
def test_every_video_plays_and_every_row_is_in_the_manifest(tmp_path, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_local")
    rows = [{**row, "num_frames": None} for row in prompts(9)]
    rows[4]["num_frames"] = 12  # a per-row override renders in its own batch
    cfg, summary = _render(tmp_path, rows, backend)

    assert (summary.total_rows, summary.ok, summary.failed, summary.rendered) == (9, 9, 0, 9)
    assert summary.complete
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert table["id"].to_pylist() == [r["id"] for r in rows]
    for row in table.to_pylist():
        assert row["status"] == "ok" and row["error"] is None
        info = probe(stored(cfg.output.uri, row))
        assert info == {"codec": "h264", "pix_fmt": "yuv420p", "size": (32, 32),
                        "frames": row["num_frames"], "faststart": True}
        assert os.path.getsize(stored(cfg.output.uri, row)) == row["bytes"]
    assert [r["num_frames"] for r in table.to_pylist() if r["id"] == "row-004"] == [12]
    assert os.path.exists(tmp_path / "out" / "_SUCCESS")
    assert verify(cfg.output.uri).problems == []


@pytest.mark.parametrize("model, num_frames", [("tiny:modelscope", 8), ("tiny:wan", 5)])
def test_same_config_twice_gives_byte_identical_videos_and_stable_ids_and_seeds(tmp_path, model,
                                                                                num_frames):
    rows = [{"prompt": f"a lighthouse in a storm, take {i}"} for i in range(4)]  # no id column
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    tables = []
    for name in ("a", "b"):
        cfg = validate(tiny_config(src, str(tmp_path / name), model={"path": model},
                                   render={"num_frames": num_frames},
                                   cluster={"backend": "inline"}))
        render(cfg, progress=False)
        tables.append(read_manifest(tmp_path / name))
    first, second = tables
    assert [r["id"] for r in first] == [r["id"] for r in second]
    assert all(r["id"].startswith("h") for r in first)
    assert [r["seed"] for r in first] == [r["seed"] for r in second]
    assert len({r["seed"] for r in first}) == 4
    assert [r["sha256"] for r in first] == [r["sha256"] for r in second]
    for a, b in zip(first, second):
        with open(stored(tmp_path / "a", a), "rb") as fa, open(stored(tmp_path / "b", b), "rb") as fb:
            assert fa.read() == fb.read()


@pytest.mark.parametrize("kind, num_frames", [("modelscope", 8), ("wan", 5)])
def test_unet3d_and_dit_pipelines_both_render(tmp_path, kind, num_frames):
    cfg, summary = _render(tmp_path, prompts(2), "inline", model={"path": f"tiny:{kind}"},
                           render={"num_frames": num_frames})
    assert summary.ok == 2
    for row in read_manifest(tmp_path / "out"):
        assert probe(stored(tmp_path / "out", row))["frames"] == num_frames


def test_a_saved_model_folder_loads_through_from_pretrained(tmp_path):
    model_dir = tmp_path / "model"
    result = run_cli("make-tiny-model", str(model_dir), "--kind", "wan")
    assert result.returncode == 0, result.stderr
    assert (model_dir / "model_index.json").exists()
    assert list(model_dir.glob("transformer/*.safetensors"))
    _, summary = _render(tmp_path, prompts(1), "inline", model={"path": str(model_dir)},
                         render={"num_frames": 5})
    assert summary.ok == 1


def test_rerun_renders_nothing_and_keeps_the_videos(tmp_path):
    cfg, first = _render(tmp_path, prompts(5), "inline")
    out = tmp_path / "out"
    before = {p: os.path.getmtime(p) for p in (out / "videos").iterdir()}
    derived = {name: os.path.getmtime(out / name) for name in ("manifest.parquet", "report.html",
                                                               "job.json")}
    second = render(cfg, progress=False)
    assert (first.rendered, second.rendered, second.skipped, second.ok) == (5, 0, 5, 5)
    assert {p: os.path.getmtime(p) for p in (out / "videos").iterdir()} == before
    # Complete, for this very input: nothing is consolidated or rewritten.
    assert second.nothing_to_do and second.complete
    assert {name: os.path.getmtime(out / name) for name in derived} == derived


def test_a_rerun_after_the_input_changed_looks_at_every_row_again(tmp_path):
    cfg, _ = _render(tmp_path, prompts(3), "inline")
    write_prompts(cfg.input.uri, prompts(5))  # two rows more
    grown = render(cfg, progress=False)
    assert not grown.nothing_to_do and (grown.rendered, grown.skipped, grown.ok) == (2, 3, 5)
    write_prompts(cfg.input.uri, prompts(5))  # the same rows, written again
    rewritten = render(cfg, progress=False)
    assert not rewritten.nothing_to_do and (rewritten.rendered, rewritten.ok) == (0, 5)
    assert render(cfg, progress=False).nothing_to_do


def test_verify_catches_a_deleted_and_a_corrupted_video(tmp_path):
    cfg, _ = _render(tmp_path, prompts(3), "inline")
    assert run_cli("verify", cfg.output.uri).returncode == 0
    rows = read_manifest(tmp_path / "out")
    os.remove(stored(cfg.output.uri, rows[0]))
    with open(stored(cfg.output.uri, rows[1]), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    result = run_cli("verify", cfg.output.uri)
    assert result.returncode == 1
    assert "video of row 'row-000' is missing" in result.stdout
    assert "video of row 'row-001' does not match its sha256" in result.stdout
    assert "row-002" not in result.stdout


def test_memory_filesystem_output(tmp_path):
    """Any fsspec URL works for the output; memory:// lives in this process, so inline only."""
    import fsspec

    cfg, summary = _render(tmp_path, prompts(2), "inline")
    src = cfg.input.uri
    cfg = validate(tiny_config(src, "memory://reelfarm-e2e/out", cluster={"backend": "inline"}))
    summary = render(cfg, progress=False)
    fs = fsspec.filesystem("memory")
    assert summary.ok == 2
    assert fs.exists("/reelfarm-e2e/out/_SUCCESS")
    assert len(fs.glob("/reelfarm-e2e/out/videos/*.mp4")) == 2
    assert verify(cfg.output.uri).problems == []
