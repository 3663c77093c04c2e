"""Broken inputs and configs, each with the exit code, message and manifest rows it must give.

Whole-job problems run ``reelfarm render`` in a subprocess and must stop it with exit 1 and one
line on stderr, before a Ray cluster starts or a model loads (the Ray temp dir stays empty).
Row problems are grouped into one real render job (tests/hostile_corpus.py): each bad row fails
alone with a machine-readable error and the job finishes with exit 3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli, stored, write_prompts
from helpers import read_manifest, write_config
from hostile_corpus import CASES, run_corpus

from jobs.input.dataset import iter_batches, open_dataset


def _raw_config(text: str):
    def setup(tmp):
        (tmp / "job.yaml").write_text(text)
        return [str(tmp / "job.yaml")]
    return setup


def _with(*args: str, rows: list[dict] | None = None, **sections):
    return lambda tmp: [write_config(tmp, rows=rows, prompts_file="in.parquet", **sections),
                        *args]


def _input_file(content: bytes | None = None, rows: list[dict] | None = None, cut: int | None = None):
    """Config whose input is a file holding ``content``, or ``rows`` cut to ``cut`` bytes."""
    def setup(tmp):
        src = tmp / "in.parquet"
        if rows is not None:
            write_prompts(src, rows)
            if cut is not None:
                src.write_bytes(src.read_bytes()[:cut])
        else:
            src.write_bytes(content)
        return [write_config(tmp, prompts_file="in.parquet")]
    return setup


def _input_folder(files: dict[str, list[dict] | bytes]):
    def setup(tmp):
        folder = tmp / "in"
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            else:
                write_prompts(folder / name, content)
        return [write_config(tmp, prompts_file="in.parquet"), "--input", str(folder)]
    return setup


def _existing_output(job: bytes):
    def setup(tmp):
        (tmp / "out").mkdir()
        (tmp / "out" / "job.json").write_bytes(job)
        return [write_config(tmp, prompts_file="in.parquet")]
    return setup


def _stored_with_other_settings(tmp):
    """An output whose earlier run stored a row (its receipt) with settings of its own."""
    setup = _existing_output(OTHER_FINGERPRINT.encode())(tmp)
    (tmp / "out" / "receipts").mkdir()
    (tmp / "out" / "receipts" / "row-000.json").write_text("{}")
    return setup


def _output_under_a_file(tmp):
    (tmp / "a-file").write_text("not a folder")
    return [write_config(tmp, prompts_file="in.parquet"), "--output", str(tmp / "a-file" / "out")]


PARQUET_MAGIC_ONLY = b"PAR1PAR1"
OTHER_FINGERPRINT = json.dumps({"fingerprint": "0" * 16, "settings": {"render.num_frames": 99}})

# (name, setup -> argv after "render", exit code, fragments of the stderr line)
JOB_CASES = [
    # --- the config ---
    ("config file missing", lambda tmp: [str(tmp / "nope.yaml")], 1, ["cannot read config"]),
    ("config not YAML", _raw_config("input: [unclosed\n"), 1, ["line 2", "is not valid YAML"]),
    ("config a list", _raw_config("- input\n- model\n"), 1, ["must be a mapping of sections, got list"]),
    ("config empty", _raw_config(""), 1, ["input: required key is missing"]),
    ("misspelt key", _with("--set", "render.num_frame=8"), 1, ["render.num_frame: unknown key"]),
    ("section missing", _raw_config("input: {uri: in.parquet}\noutput: {uri: out}\n"), 1,
     ["model: required key is missing"]),
    ("zero frames", _with("--set", "render.num_frames=0"), 1,
     ["render.num_frames: Input should be greater than or equal to 1 (got 0)"]),
    ("size the model cannot take", _with("--set", "render.height=100"), 1,
     ["render.height: 100 is not a multiple of 8"]),
    ("NaN guidance", _with("--set", "render.guidance_scale=.nan"), 1,
     ["render.guidance_scale: must be a finite number"]),
    ("frames over limits", _with("--set", "render.num_frames=1000"), 1,
     ["render.num_frames: 1000 is over limits.max_frames = 256"]),
    ("lowered limit", _with("--set", "limits.max_inference_steps=1"), 1,
     ["render.num_inference_steps: 2 is over limits.max_inference_steps = 1"]),
    ("invalid limit", _with("--set", "limits.max_frames=0"), 1,
     ["limits.max_frames: Input should be greater than or equal to 1 (got 0)"]),
    ("unknown tiny model", _with("--set", "model.path=tiny:nope"), 1,
     ["model.path: unknown tiny model 'tiny:nope'", "tiny:modelscope"]),
    ("model folder missing", _with("--set", "model.path=/nonexistent/model"), 1,
     ["model.path: /nonexistent/model is not a diffusers model folder"]),
    ("empty --output", _with("--output", ""), 1, ["output.uri: Input should be a valid string"]),
    ("blank output", _with("--set", "output.uri='  '"), 1, ["output.uri: must not be empty"]),
    ("--set without =", _with("--set", "render.num_frames"), 1, ["expected KEY=VALUE"]),
    ("--workers not a number", _with("--workers", "many"), 2, ["invalid int value: 'many'"]),
    # --- the input ---
    ("input missing", _with("--input", "/nonexistent/prompts.parquet"), 1,
     ["input /nonexistent/prompts.parquet does not exist", "check input.uri (or --input)"]),
    ("input folder empty", _input_folder({}), 1, ["holds no Parquet files"]),
    ("CSV named .parquet", _input_file(b"id,prompt\n1,a cat\n"), 1,
     ["in.parquet is not a readable Parquet file", "rewrite it"]),
    ("empty file", _input_file(b""), 1, ["in.parquet is not a readable Parquet file"]),
    ("magic bytes only", _input_file(PARQUET_MAGIC_ONLY), 1, ["is not a readable Parquet file"]),
    ("truncated Parquet", _input_file(rows=prompts(50), cut=600), 1,
     ["in.parquet is not a readable Parquet file"]),
    ("no prompt column", _with(rows=[{"id": "a", "text": "a cat"}]), 1,
     ["has no 'prompt' column (columns: id, text)"]),
    ("prompt column of numbers", _with(rows=[{"id": "a", "prompt": 7}]), 1,
     ["column 'prompt' has type int64 but must hold text"]),
    ("seed column of text", _with(rows=[{"prompt": "a", "seed": "42"}]), 1,
     ["column 'seed' has type string but must hold numbers"]),
    ("carried column missing", _with(input={"carry_columns": ["source"]}), 1,
     ["lacks the carried column(s) source", "input.carry_columns"]),
    ("files with different columns", _input_folder({"a.parquet": prompts(2),
                                                    "b.parquet": [{"prompt": "p", "seed": 1}]}), 1,
     ["b.parquet has columns ['prompt', 'seed']", "all files must share one schema"]),
    ("one corrupt file among good ones", _input_folder({"a.parquet": prompts(2), "b.parquet": b"garbage",
                                                        "c.parquet": prompts(2, "c")}), 1,
     ["in/b.parquet is not a readable Parquet file"]),
    # --- the output ---
    ("output under a file", _output_under_a_file, 1,
     ["a-file/out is inside", "a-file, which is a file, not a folder", "choose another output.uri"]),
    ("job.json not JSON", _existing_output(b"{not json"), 1, ["job.json is not valid JSON"]),
    ("output made with other settings", _stored_with_other_settings, 1,
     ["was rendered with other settings", "render.num_frames: 99 -> 8"]),
]


@pytest.mark.parametrize("setup, code, fragments", [c[1:] for c in JOB_CASES],
                         ids=[c[0] for c in JOB_CASES])
def test_whole_job_problems_stop_before_anything_starts(tmp_path, setup, code, fragments):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    result = run_cli("render", *setup(tmp_path), "--quiet", env={"RAY_TMPDIR": str(ray_tmp)},
                     timeout=60)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    if code == 1:
        assert result.stderr.strip() == line and line.startswith("reelfarm: "), result.stderr
    for fragment in fragments:
        assert fragment in line
    assert not any(ray_tmp.iterdir()), "a Ray cluster was started"
    assert not (tmp_path / "out" / "videos").exists() and not (tmp_path / "out" / "manifests").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("plan", write_config(tmp_path, prompts_file="in.parquet"), "--input",
                     str(tmp_path / "nope"), "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "InputError" in result.stderr


# --- rows: one render job, many bad rows ---------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return run_corpus(str(tmp_path_factory.getbasetemp() / "hostile-corpus"))


@pytest.fixture(scope="module")
def manifest_rows(corpus):
    assert corpus.returncode == 3, corpus.stderr
    return read_manifest(corpus.output)


def test_bad_rows_fail_alone_and_the_job_finishes_with_exit_3(corpus, manifest_rows):
    failed = sum(c.status == "failed" for c in CASES)
    assert f"rows: {len(CASES)}  ok: {len(CASES) - failed}  failed: {failed}" in corpus.stdout
    assert "failed with invalid_value" in corpus.stdout
    assert len(manifest_rows) == len(CASES)
    assert (corpus.output / "_SUCCESS").exists()
    job = json.loads((corpus.output / "job.json").read_text())
    assert job["counts"] == {"rows": len(CASES), "ok": len(CASES) - failed, "failed": failed,
                             "committed": len(CASES)}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_each_row_is_recorded_with_its_outcome(manifest_rows, corpus, index):
    case, row = CASES[index], manifest_rows[index]
    assert row["row_index"] == index
    assert (row["status"], row["error_code"]) == (case.status, case.error_code), row["error"]
    if case.status == "failed":
        assert row["error"].startswith(f"{case.error_code}: ") and case.message in row["error"]
        assert row["video_uri"] is None and row["prompt_truncated"] is None
    else:
        assert row["error"] is None
        assert Path(stored(corpus.output, row)).parent == corpus.output / "videos"
        assert os.path.getsize(stored(corpus.output, row)) == row["bytes"] > 0
        assert row["prompt_truncated"] is (case.name == "prompt longer than the text encoder reads")


def test_the_output_of_bad_rows_verifies_and_a_rerun_renders_nothing(corpus, manifest_rows):
    verified = run_cli("verify", str(corpus.output))
    assert verified.returncode == 0, verified.stdout
    rerun = run_cli("render", str(corpus.root / "job.yaml"), "--quiet",
                    env={"RAY_TMPDIR": str(corpus.ray_tmp)})
    assert rerun.returncode == 3, rerun.stderr
    assert "nothing to do: every row is committed" in rerun.stdout
    assert f"rows: {len(CASES)}  ok: " in rerun.stdout and "failed with invalid_" in rerun.stdout
    assert len(pq.read_table(corpus.output / "manifest.parquet")) == len(manifest_rows)


def test_invalid_utf8_in_a_carried_column_is_replaced_not_fatal(tmp_path):
    text = pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": ["p", "q"], "source": text}), tmp_path / "in.parquet")
    dataset = open_dataset(str(tmp_path / "in.parquet"), ["source"])
    rows = [row for batch in iter_batches(dataset, 10) for row in batch.to_pylist()]
    assert rows == [{"prompt": "p", "source": "ok"}, {"prompt": "q", "source": "caf\ufffd"}]
