"""What tests share: tiny configs, Parquet prompt files, and running the CLI as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_prompts(path, rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> str:
    """Write prompt rows to a Parquet file and return its path."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return str(path)


def tiny_config(input_uri: str, output_uri: str, **sections) -> dict:
    """A config that renders in a fraction of a second per row on a CPU."""
    cfg = {
        "input": {"uri": input_uri},
        "model": {"path": "tiny:modelscope"},
        "render": {"num_frames": 8, "height": 32, "width": 32, "num_inference_steps": 2,
                   "seed": 1, "batch_size": 2},
        "encode": {"fps": 8, "crf": 23, "preset": "ultrafast"},
        "output": {"uri": output_uri, "shard_size": 4},
        "cluster": {"num_workers": 2, "shard_timeout_s": 120},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def stages_config(input_uri: str, output_uri: str, keyframe: str = "tiny:sd",
                  video: str = "tiny:ltx-i2v", **sections) -> dict:
    """A two-stage config (a keyframe per prompt, then a video from it) on tiny models."""
    cfg = tiny_config(input_uri, output_uri, **sections)
    del cfg["model"]
    cfg["render"].update(num_frames=9, batch_size=1)  # LTX: 8k+1 frames
    cfg["stages"] = [{"name": "keyframe", "model": {"path": keyframe},
                      "render": {"guidance_scale": 5.0}},
                     {"name": "video", "model": {"path": video}}]
    for stage in cfg["stages"]:
        stage.update(sections.get(f"stage_{stage['name']}", {}))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("stage_")}
    return cfg


def prompts(n: int, prefix: str = "row") -> list[dict]:
    return [{"id": f"{prefix}-{i:03d}", "prompt": f"a small test scene number {i}"} for i in range(n)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``reelfarm`` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def stored(output, row: dict) -> str:
    """Where a manifest row's video is on local disk: its path is relative to the output."""
    return os.path.join(str(output), row["video_uri"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_client():
    """A boto3 client of the endpoint the ``s3_env`` fixture points this process at."""
    import boto3

    return boto3.client("s3")
