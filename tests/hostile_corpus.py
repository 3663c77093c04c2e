"""One render job over a dataset of broken and hostile rows, shared by the bad-input and
security tests so the suite pays for one Ray cluster and one model load.

The job runs the real CLI in a subprocess on a real local Ray cluster with the tiny model,
with three things a user would not see: an ``ffmpeg`` on PATH that logs its argv before running
the real one, a fake AWS secret in the environment, and a private Ray temp dir whose logs the
tests search.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import run_cli, tiny_config
from helpers import write_config

SECRET = "rfTestSecret/0123456789+abcdefXYZ"
ACCESS_KEY = "AKIARFTESTKEY0000000"
HOSTILE_IDS = ("../../x", "/abs", "-version", "--help", "..", "a/../../b", "C:\\win\\evil",
               "$(touch pwned); `id` | rm -rf /")
ARGV_SEPARATOR = "--- call ---"


@dataclass(frozen=True)
class Case:
    """A row, and what its manifest row must say: status, error code, a fragment of the error."""

    name: str
    row: dict
    status: str
    error_code: str | None = None
    message: str | None = None


def _ok(name: str, row: dict) -> Case:
    return Case(name, row, "ok")


def _bad(name: str, row: dict, code: str, message: str) -> Case:
    return Case(name, row, "failed", code, message)


# The main file: every column typed as a well-behaved producer would type it.
MAIN_CASES = [
    _ok("good row", {"id": "good", "prompt": "a red ball"}),
    _bad("null prompt", {"id": "p-null", "prompt": None}, "invalid_prompt", "null, empty or blank"),
    _bad("empty prompt", {"id": "p-empty", "prompt": ""}, "invalid_prompt", "null, empty or blank"),
    _bad("blank prompt", {"id": "p-blank", "prompt": " \t\n "}, "invalid_prompt", "null, empty or blank"),
    _ok("prompt longer than the text encoder reads", {"id": "p-long", "prompt": "word " * 100}),
    _bad("prompt over limits.max_prompt_chars", {"id": "p-huge", "prompt": "x" * 30000},
         "invalid_prompt", "over limits.max_prompt_chars = 20000"),
    _bad("null id", {"id": None, "prompt": "null id"}, "invalid_id", "id is null"),
    _bad("empty id", {"id": "", "prompt": "empty id"}, "invalid_id", "empty or blank"),
    _bad("blank id", {"id": "  ", "prompt": "blank id"}, "invalid_id", "empty or blank"),
    _bad("very long id", {"id": "i" * 600, "prompt": "long id"}, "invalid_id",
         "600 characters, over limits.max_id_chars = 512"),
    _bad("id with control characters", {"id": "nul\x00line\n", "prompt": "p"}, "invalid_id",
         "control characters"),
    _ok("first of a duplicated id", {"id": "dup", "prompt": "first"}),
    _bad("duplicated id", {"id": "dup", "prompt": "second"}, "duplicate_id", "appears earlier"),
    *[_ok(f"hostile id {i!r}", {"id": i, "prompt": "a hostile id"}) for i in HOSTILE_IDS],
    _bad("duplicated hostile id", {"id": "-version", "prompt": "again"}, "duplicate_id",
         "appears earlier"),
    _bad("zero frames", {"id": "f-0", "prompt": "p", "num_frames": 0}, "invalid_value",
         "num_frames must be >= 1, got 0"),
    _bad("negative frames", {"id": "f-neg", "prompt": "p", "num_frames": -3}, "invalid_value",
         "num_frames must be >= 1"),
    _bad("frames beyond int32", {"id": "f-huge", "prompt": "p", "num_frames": 2**40},
         "invalid_value", "over limits.max_frames = 256"),
    _bad("height the model cannot take", {"id": "h-100", "prompt": "p", "height": 100},
         "invalid_value", "height: 100 is not a multiple of 8"),
    _bad("height over limits", {"id": "h-big", "prompt": "p", "height": 4096}, "invalid_value",
         "over limits.max_height = 2048"),
    _bad("zero width", {"id": "w-0", "prompt": "p", "width": 0}, "invalid_value",
         "width must be >= 1"),
    _bad("zero steps", {"id": "s-0", "prompt": "p", "num_inference_steps": 0}, "invalid_value",
         "num_inference_steps must be >= 1"),
    _bad("steps over limits", {"id": "s-big", "prompt": "p", "num_inference_steps": 10**6},
         "invalid_value", "over limits.max_inference_steps = 500"),
    _bad("NaN guidance", {"id": "g-nan", "prompt": "p", "guidance_scale": math.nan},
         "invalid_value", "guidance_scale must be a finite number, got nan"),
    _bad("infinite guidance", {"id": "g-inf", "prompt": "p", "guidance_scale": -math.inf},
         "invalid_value", "guidance_scale must be a finite number, got -inf"),
    _bad("negative seed", {"id": "seed-neg", "prompt": "p", "seed": -1}, "invalid_value",
         "seed -1 is outside [0, 9223372036854775807]"),
    _bad("zero fps", {"id": "fps-0", "prompt": "p", "fps": 0}, "invalid_value", "fps 0 is outside [1, 240]"),
    _bad("fps over the limit", {"id": "fps-big", "prompt": "p", "fps": 100000}, "invalid_value",
         "fps 100000 is outside [1, 240]"),
]
MAIN_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                         ("negative_prompt", pa.string()), ("num_frames", pa.int64()),
                         ("height", pa.int64()), ("width", pa.int64()),
                         ("num_inference_steps", pa.int64()), ("guidance_scale", pa.float64()),
                         ("seed", pa.int64()), ("fps", pa.int64())])

# The second file: what a careless producer writes. Same columns, other types: strings that
# are not UTF-8 (Parquet readers do not check) and unsigned seeds beyond int64.
_NOT_UTF8 = b"\xff\xfe broken"
ODD_CASES = [
    _bad("prompt not UTF-8", {"id": b"u-prompt", "prompt": _NOT_UTF8}, "invalid_prompt",
         "prompt is not valid UTF-8"),
    _bad("id not UTF-8", {"id": b"\xc3\x28", "prompt": b"fine"}, "invalid_id",
         "id is not valid UTF-8"),
    _bad("negative prompt not UTF-8", {"id": b"u-negative", "prompt": b"fine", "negative_prompt": _NOT_UTF8},
         "invalid_value", "negative_prompt must be text in valid UTF-8"),
    _bad("seed beyond the generator's range", {"id": b"seed-big", "prompt": b"fine", "seed": 2**64 - 1},
         "invalid_value", "is outside [0, 9223372036854775807]"),
]

CASES = MAIN_CASES + ODD_CASES


@dataclass(frozen=True)
class CorpusRun:
    root: Path  # everything the job was given and made lives under here
    output: Path
    ray_tmp: Path
    argv_log: Path
    returncode: int
    stdout: str
    stderr: str


def _odd_table() -> pa.Table:
    """Text columns written as bytes and viewed as strings: invalid UTF-8 stays in the file."""
    def text(name):
        return pa.array([c.row.get(name) for c in ODD_CASES], pa.binary()).view(pa.string())

    def ints(name, kind=pa.int64()):
        return pa.array([c.row.get(name) for c in ODD_CASES], kind)

    columns = {"id": text("id"), "prompt": text("prompt"), "negative_prompt": text("negative_prompt")}
    for field in MAIN_SCHEMA:
        if field.name not in columns:
            columns[field.name] = ints(field.name, pa.uint64() if field.name == "seed" else field.type)
    return pa.table(columns)


def _ffmpeg_shim(bin_dir: Path, argv_log: Path) -> None:
    """An ``ffmpeg`` that records each call's argv, one argument per line, then runs the real one."""
    import imageio_ffmpeg

    bin_dir.mkdir()
    shim = bin_dir / "ffmpeg"
    shim.write_text(f"#!/bin/sh\n{{ echo '{ARGV_SEPARATOR}'; printf '%s\\n' \"$@\"; }} >> '{argv_log}'\n"
                    f"exec '{imageio_ffmpeg.get_ffmpeg_exe()}' \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@functools.cache
def run_corpus(root: str) -> CorpusRun:
    """Render every case in one job; cached so each test module reuses the same run."""
    base = Path(root)
    (base / "in").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([c.row for c in MAIN_CASES], schema=MAIN_SCHEMA),
                   base / "in" / "a-main.parquet")
    pq.write_table(_odd_table(), base / "in" / "b-odd.parquet")
    argv_log = base / "ffmpeg-argv.log"
    _ffmpeg_shim(base / "bin", argv_log)
    output = base / "out"
    config = write_config(base, tiny_config(str(base / "in"), str(output)))
    # Unix socket paths must stay short, so the Ray temp dir cannot live under pytest's tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf-ray-"))
    atexit.register(shutil.rmtree, ray_tmp, True)
    env = {"PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}", "RAY_TMPDIR": str(ray_tmp),
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": ACCESS_KEY}
    result = run_cli("render", str(config), "--quiet", env=env)
    return CorpusRun(base, output, ray_tmp, argv_log, result.returncode, result.stdout, result.stderr)
