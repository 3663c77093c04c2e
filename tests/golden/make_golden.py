"""Write the golden outputs that tests/test_golden.py reads: a few tiny rows of a single-stage
job (with WebDataset tars) and of a two-stage job, as this version of reelfarm writes them.

The folders are committed, all but their videos (no media in the repository): the test puts
back the videos today's code renders for the same rows (``restore_videos``), and ``verify``
then checks them against the sha256s the old manifests recorded, byte for byte. The folders are
made again only on purpose, by a format change that migrates explicitly; the test then proves
that outputs written before it still resume, verify, report and repair. Run from the
repository root:

    python -m tests.golden.make_golden
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDER = "<golden>"  # where the output lay when it was made: no machine's path is kept
PROMPTS = ["a red kite over a beach", "a lighthouse at night", "", "a cat on a windowsill"]


def job_config(name: str, folder: str) -> dict:
    """The config each golden output was made with, pointing at ``folder`` (its input is
    ``folder/prompts.parquet``). The test resumes a copy with this same config."""
    cfg = {
        "input": {"uri": os.path.join(folder, "prompts.parquet")},
        "render": {"num_frames": 8, "height": 32, "width": 32, "num_inference_steps": 2,
                   "seed": 7},
        "encode": {"fps": 8, "crf": 30, "preset": "ultrafast"},
        "output": {"uri": folder, "shard_size": 2},
        "cluster": {"backend": "inline"},
    }
    if name == "single":
        cfg["model"] = {"path": "tiny:modelscope"}
        cfg["output"]["webdataset"] = {"rows_per_shard": 2}
    else:
        cfg["render"]["num_frames"] = 9  # LTX renders 8k+1 frames
        cfg["stages"] = [{"name": "keyframe", "model": {"path": "tiny:sd"}},
                         {"name": "video", "model": {"path": "tiny:ltx-i2v"}}]
    return cfg


def write_prompts(folder: str, count: int) -> None:
    """The first ``count`` prompts (the blank one fails its row as invalid_prompt)."""
    rows = [{"id": f"golden-{i}", "prompt": p} for i, p in enumerate(PROMPTS[:count])]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "prompts.parquet"))


def render_rows(name: str, folder: str) -> None:
    """Render the golden's rows (3: the test's input grows to 4, a resume renders the last)."""
    from jobs.config import validate
    from jobs.driver import render

    os.makedirs(folder)
    write_prompts(folder, 3)
    render(validate(job_config(name, folder)), progress=False)


def restore_videos(name: str, rendered: str, folder: str) -> None:
    """Put into the golden copy ``folder`` the videos of ``render_rows(name, rendered)``."""
    shutil.copytree(os.path.join(rendered, "videos"), os.path.join(folder, "videos"))


def make(name: str, target: str) -> None:
    with tempfile.TemporaryDirectory(prefix="reelfarm-golden-") as tmp:
        folder = os.path.join(tmp, name)
        render_rows(name, folder)
        shutil.rmtree(os.path.join(folder, "videos"))  # not committed: see restore_videos
        os.remove(os.path.join(folder, "report.html"))  # the test writes it with today's code
        shutil.rmtree(os.path.join(folder, "_lease"), ignore_errors=True)
        _unplace(os.path.join(folder, "job.json"), folder)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)


def _unplace(path: str, folder: str) -> None:
    """Replace the folder the output was made in by ``PLACEHOLDER`` in ``job.json``."""
    with open(path) as f:
        job = json.load(f)
    text = json.dumps(job, indent=2, sort_keys=True).replace(folder, PLACEHOLDER)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    for name in sys.argv[1:] or ("single", "stages"):
        make(name, os.path.join(HERE, name))
        print(f"wrote {os.path.join(HERE, name)}")
