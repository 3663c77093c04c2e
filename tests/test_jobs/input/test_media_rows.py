"""Hostile media in a real job: every bad URI and every bad file fails its own row as
``invalid_media`` with a message, nothing outside the media roots is opened, no worker crashes,
and the good rows beside them render.

"Not opened" is checked the hard way: the file outside the roots is a FIFO, and opening a FIFO
for reading blocks until a writer comes, which none does: a job that opened it would hang.
"""

from __future__ import annotations

import os

import media_corpus as corpus
import pytest
from helpers import tiny_config, write_prompts
from helpers import read_manifest

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render

CREDENTIAL = "sekr3tKEYdoNotLog"
URI_REFUSALS = ("outside the media roots", "scheme 'ftp' is not allowed", "carries credentials")


def _job(tmp_path, model: str, rows: list[dict], backend: str, **limits):
    src = write_prompts(tmp_path / "data" / "prompts.parquet", rows)
    out = str(tmp_path / "out")
    cfg = validate(tiny_config(src, out, model={"path": f"tiny:{model}"},
                               render={"num_frames": 2, "strength": 0.5},
                               limits=limits, cluster={"backend": backend, "num_workers": 1}))
    summary = render(cfg, progress=False)
    table = read_manifest(out)
    assert verify(out).problems == []
    return summary, {r["id"]: r for r in table}


def _trap(tmp_path) -> str:
    """A FIFO outside the media roots, and a symlink to it inside them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "secret.png"
    os.mkfifo(fifo)
    corpus.symlink(tmp_path / "data" / "link.png", fifo)
    return str(fifo)


@pytest.mark.timeout(300)
def test_hostile_images_fail_their_rows_unread_and_the_rest_renders(tmp_path, ray_local):
    data = tmp_path / "data"
    fifo = _trap(tmp_path)
    good = corpus.good_png(data, size=(48, 40))
    refused = {  # id: (image, words the message must hold)
        "outside": (fifo, "outside the media roots"),
        "dotdot": ("../outside/secret.png", "outside the media roots"),
        "symlink-out": ("link.png", "outside the media roots"),
        "file-uri": (f"file://{fifo}", "outside the media roots"),
        "http": ("http://127.0.0.1:9/x.png", "outside the media roots"),
        "ftp": ("ftp://example.com/x.png", "scheme 'ftp' is not allowed"),
        "credentials": (f"s3://AKIAX:{CREDENTIAL}@bucket/x.png", "carries credentials"),
        "text": (os.path.basename(corpus.text_named_png(data)), "is not an image"),
        "truncated": (os.path.basename(corpus.truncated_png(data)), "cannot be decoded"),
        "animated": (os.path.basename(corpus.animated_gif(data)), "animated"),
        "bomb": (os.path.basename(corpus.bomb_png(data, 3000, 3000)),
                 "over limits.max_media_pixels"),
        "too-big": (os.path.basename(corpus.oversized_png(data, 300_000)),
                    "over limits.max_media_bytes"),
        "missing": ("nowhere.png", "not found"),
    }
    handled = {  # odd but valid images: converted to RGB and rendered
        "good": os.path.basename(good),
        "sixteen-bit": os.path.basename(corpus.png16(data)),
        "cmyk": os.path.basename(corpus.cmyk_jpeg(data)),
        "grey": os.path.basename(corpus.grey_png(data)),
    }
    rows = [{"id": i, "prompt": "a hostile row", "image": image} for i, (image, _) in refused.items()]
    rows += [{"id": i, "prompt": "a fine row", "image": image} for i, image in handled.items()]
    summary, by_id = _job(tmp_path, "svd", rows, "ray", max_media_pixels=4_000_000,
                          max_media_bytes=250_000)

    assert (summary.ok, summary.failed, summary.workers_replaced) == (len(handled), len(refused), 0)
    for row_id, (_, words) in refused.items():
        row = by_id[row_id]
        assert (row["status"], row["error_code"]) == ("failed", "invalid_media"), row
        assert words in row["error"], row["error"]
        assert CREDENTIAL not in row["error"] and row["video_uri"] is None
        # Refused URIs are not recorded as inputs; bad files that were read are.
        assert (row["input_image_uri"] is None) == (words in URI_REFUSALS)
    for row_id in handled:
        assert by_id[row_id]["status"] == "ok", by_id[row_id]["error"]
        assert len(by_id[row_id]["input_image_sha256"]) == 64


def test_images_inline_as_hugging_face_structs(tmp_path):
    """The ``{bytes, path}`` struct of a Hugging Face Image feature: bytes win over the path."""
    good = corpus.good_png(tmp_path / "data", size=(40, 40))
    with open(good, "rb") as f:
        png = f.read()
    rows = [{"id": "bytes", "prompt": "p", "seed": 3,
             "image": {"bytes": png, "path": "elsewhere.png"}},
            {"id": "path", "prompt": "p", "seed": 3, "image": {"bytes": None, "path": "good.png"}},
            {"id": "garbage", "prompt": "p", "seed": 3,
             "image": {"bytes": b"\x00 not an image", "path": None}}]
    summary, by_id = _job(tmp_path, "svd", rows, "inline")
    assert (summary.ok, summary.failed) == (2, 1)
    assert by_id["bytes"]["input_image_uri"] is None
    assert by_id["bytes"]["input_image_sha256"] == by_id["path"]["input_image_sha256"]
    assert by_id["path"]["input_image_uri"] == good
    assert by_id["bytes"]["sha256"] == by_id["path"]["sha256"]  # same image and seed
    assert by_id["garbage"]["error_code"] == "invalid_media"
    assert "is not an image" in by_id["garbage"]["error"]


@pytest.mark.timeout(300)
def test_hostile_videos_fail_their_rows_and_the_rest_renders(tmp_path):
    data = tmp_path / "data"
    fifo = _trap(tmp_path)
    good = corpus.ramp_video(data, frames=4, size=(48, 40), name="good.mp4")
    refused = {
        "outside": (fifo, "outside the media roots"),
        "audio-only": (os.path.basename(corpus.audio_only(data)), "has no video stream"),
        "truncated": (os.path.basename(corpus.truncated(data, good, keep=0.3)), "video"),
        "too-short": (os.path.basename(corpus.ramp_video(data, frames=1, name="short.mp4")),
                      "the row needs 2"),
        "garbage": (os.path.basename(corpus.garbage(data)), "video"),
        "a-picture": (os.path.basename(corpus.good_png(data)), "not a video in an allowed container"),
        "playlist": (os.path.basename(corpus.hls_playlist(data, good, port=9)), "video"),
    }
    rows = [{"id": i, "prompt": "a hostile row", "video": v} for i, (v, _) in refused.items()]
    rows.append({"id": "good", "prompt": "a fine row", "video": "good.mp4"})
    summary, by_id = _job(tmp_path, "modelscope-v2v", rows, "inline")

    assert (summary.ok, summary.failed) == (1, len(refused))
    for row_id, (_, words) in refused.items():
        row = by_id[row_id]
        assert (row["status"], row["error_code"]) == ("failed", "invalid_media"), row
        assert words in row["error"], row["error"]
    assert by_id["good"]["input_video_sha256"] is not None


def test_a_row_without_the_input_its_pipeline_needs_fails_alone(tmp_path):
    corpus.good_png(tmp_path / "data")
    rows = [{"id": "with", "prompt": "p", "image": "good.png"}, {"id": "without", "prompt": "p"}]
    summary, by_id = _job(tmp_path, "svd", rows, "inline")
    assert (summary.ok, summary.failed) == (1, 1)
    assert by_id["without"]["error_code"] == "missing_input"
    assert "StableVideoDiffusionPipeline needs an image per row" in by_id["without"]["error"]
