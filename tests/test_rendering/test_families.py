"""Every supported pipeline family end to end on its tiny twin: inline and on a real local Ray
cluster, every video decoded and checked, and the two runs byte-identical.

Image- and video-conditioned rows carry their media as files beside the input, named by a
relative path; two rows share a prompt and differ only in their media.
"""

from __future__ import annotations

import os

import media_corpus as corpus
import pytest
from helpers import stored, tiny_config, write_prompts
from helpers import read_manifest
from videos import probe

from jobs.verify import verify
from jobs.config import validate
from jobs.driver import render
from rendering.pipelines import ADAPTERS
from rendering.pipelines.tiny import TINY_KINDS, tiny_configs

# kind: (the smallest shape it renders exactly and fast, conditioning roles its rows carry)
FAMILIES = {
    "modelscope": ({"num_frames": 8, "height": 32, "width": 32}, ()),
    "wan": ({"num_frames": 5, "height": 32, "width": 32}, ()),
    "cogvideox": ({"num_frames": 9, "height": 32, "width": 32}, ()),
    "ltx": ({"num_frames": 9, "height": 32, "width": 32}, ()),
    "ltx-0.9.0": ({"num_frames": 9, "height": 32, "width": 32}, ()),  # batches (batch_size 2)
    "cogvideox-i2v": ({"num_frames": 9, "height": 32, "width": 32}, ("image",)),
    "wan-i2v": ({"num_frames": 5, "height": 32, "width": 32}, ("image",)),
    "ltx-i2v": ({"num_frames": 9, "height": 32, "width": 32}, ("image",)),
    "svd": ({"num_frames": 4, "height": 32, "width": 32}, ("image",)),
    "i2vgenxl": ({"num_frames": 4, "height": 32, "width": 32}, ("image",)),
    "modelscope-v2v": ({"num_frames": 4, "height": 32, "width": 32}, ("video",)),
    "cogvideox-v2v": ({"num_frames": 9, "height": 32, "width": 32}, ("video",)),
    "wan-v2v": ({"num_frames": 5, "height": 32, "width": 32}, ("video",)),
}


def test_every_tiny_kind_is_covered_here():
    # A kind that makes images (keyframes) is no video job's model: test_text_to_image.py.
    videos = {k for k in TINY_KINDS if ADAPTERS[tiny_configs(k).pipeline].makes == "video"}
    assert set(FAMILIES) == videos


def _rows(folder, shape: dict, roles: tuple[str, ...]) -> list[dict]:
    """Three rows without ids: with media, two share a prompt and differ in their media (of
    other sizes than the row's, so the crop policy is exercised)."""
    rows = [{"prompt": "a red fox in the snow"},
            {"prompt": "a red fox in the snow" if roles else "a red fox in the rain"},
            {"prompt": "a lighthouse at dusk"}]
    for i, row in enumerate(rows):
        if "image" in roles:
            image = corpus.halves((48 + 8 * i, 40), left=corpus.RED, right=(20 + 60 * i, 90, 200))
            row["image"] = os.path.basename(corpus.image_file(folder, f"still-{i}.png", image, "PNG"))
        if "video" in roles:
            row["video"] = os.path.basename(corpus.ramp_video(
                folder, frames=shape["num_frames"] + 2, size=(48 + 8 * i, 40), name=f"clip-{i}.mp4"))
    return rows


def _render(src: str, out: str, kind: str, shape: dict, backend: str):
    cfg = validate(tiny_config(src, out, model={"path": f"tiny:{kind}"},
                               render={**shape, "strength": 0.7},
                               cluster={"backend": backend, "num_workers": 1}))
    summary = render(cfg, progress=False)
    return cfg, summary, read_manifest(out)


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_family_renders_inline_and_on_ray_byte_identically(kind, tmp_path, ray_local):
    shape, roles = FAMILIES[kind]
    rows = _rows(tmp_path, shape, roles)
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    runs = [_render(src, str(tmp_path / backend), kind, shape, backend)
            for backend in ("inline", "ray")]

    for cfg, summary, table in runs:
        assert (summary.ok, summary.failed) == (3, 0), [r["error"] for r in table]
        assert verify(cfg.output.uri).problems == []
        for row in table:
            assert probe(stored(cfg.output.uri, row)) == {
                "codec": "h264", "pix_fmt": "yuv420p", "size": (shape["width"], shape["height"]),
                "frames": shape["num_frames"], "faststart": True}
            for role in roles:
                assert row[f"input_{role}_uri"] == str(tmp_path / rows[row["row_index"]][role])
                assert len(row[f"input_{role}_sha256"]) == 64
    (_, _, inline), (_, _, ray) = runs
    assert [r["sha256"] for r in inline] == [r["sha256"] for r in ray]
    assert len({r["id"] for r in inline}) == 3
    if roles:  # same prompt, other media: another row, another video
        assert inline[0]["sha256"] != inline[1]["sha256"]
