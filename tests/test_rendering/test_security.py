"""Hostile ids, credentials and model folders: nothing escapes the output, reaches a shell or
ffmpeg's options, leaks a secret, or runs code it should not.

The id and secret checks read the one render job of tests/hostile_corpus.py: its files on
disk, its stdout and stderr, the argv of every ffmpeg it ran, and its Ray logs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO, prompts, run_cli, stored, tiny_config, write_prompts
from helpers import read_manifest, write_config
from hostile_corpus import ACCESS_KEY, ARGV_SEPARATOR, HOSTILE_IDS, SECRET, run_corpus

# Every option reelfarm itself gives ffmpeg (encode_argv and count_frames); "-" is stdout.
FFMPEG_OPTIONS = {"-hide_banner", "-nostdin", "-loglevel", "-y", "-f", "-pix_fmt", "-s",
                  "-framerate", "-i", "-an", "-crf", "-movflags", "-preset", "-vcodec", "-v",
                  "-stats", "-map", "-"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.mp4$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    run = run_corpus(str(tmp_path_factory.getbasetemp() / "hostile-corpus"))
    assert run.returncode == 3, run.stderr
    return run


def _ffmpeg_calls(argv_log: Path) -> list[list[str]]:
    calls, current = [], None
    for line in argv_log.read_text().splitlines():
        if line == ARGV_SEPARATOR:
            current = []
            calls.append(current)
        else:
            current.append(line)
    return calls


def test_hostile_ids_render_inside_the_output_under_safe_names(corpus):
    table = read_manifest(corpus.output)
    rows = {r["id"]: r for r in table if r["occurrence"] == 0}
    videos = corpus.output / "videos"
    for row_id in HOSTILE_IDS:
        row = rows[row_id]
        assert row["status"] == "ok", row["error"]
        path = Path(stored(corpus.output, row))
        assert path.parent == videos and SAFE_NAME.match(path.name), path
    names = sorted(p.name for p in videos.iterdir())
    assert names == sorted(Path(r["video_uri"]).name for r in table if r["status"] == "ok")
    # Nothing was written beside the output, above it, or at the root of the filesystem.
    made = {p.relative_to(corpus.root).parts[0] for p in corpus.root.rglob("*")}
    assert made == {"in", "bin", "job.yaml", "ffmpeg-argv.log", "out"}
    assert {p.name for p in corpus.output.iterdir()} == {"videos", "manifests", "manifest.parquet",
                                                         "job.json", "_SUCCESS", "_lease", "report.html"}
    assert not (corpus.root.parent / "x").exists() and not (corpus.root.parent / "b").exists()
    assert not Path("/abs").exists() and not Path("/abs.mp4").exists()


def test_ids_never_reach_ffmpeg(corpus):
    calls = _ffmpeg_calls(corpus.argv_log)
    assert len(calls) >= 2 * len(HOSTILE_IDS)  # each video: an encode and a frame count
    for argv in calls:
        assert {a for a in argv if a.startswith("-")} <= FFMPEG_OPTIONS, argv
        for row_id in HOSTILE_IDS:
            assert not any(row_id in arg for arg in argv), (row_id, argv)


def test_a_secret_in_the_environment_is_in_no_output_and_no_log(corpus):
    searched = 0
    for root in (corpus.output, corpus.ray_tmp):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert SECRET.encode() not in data and ACCESS_KEY.encode() not in data, path
                searched += 1
    assert searched > 20  # the videos, the manifests and Ray's logs were all there to search
    for text in (corpus.stdout, corpus.stderr):
        assert SECRET not in text and ACCESS_KEY not in text


@pytest.mark.parametrize("how", ["--output", "--input", "yaml", "--debug"])
def test_credentials_in_uris_are_refused_and_never_printed(tmp_path, how):
    uri = f"s3://{ACCESS_KEY}:{SECRET}@bucket/x"
    src = write_prompts(tmp_path / "in.parquet", prompts(2))
    cfg = tiny_config(src, str(tmp_path / "out"))
    args = []
    if how == "yaml":
        cfg["output"]["uri"] = uri
    elif how == "--input":
        args = ["--input", uri.replace("s3://", "https://") + ".parquet"]
    else:
        args = ["--output", uri, *(["--debug"] if how == "--debug" else [])]
    config = write_config(tmp_path, cfg)
    result = run_cli("render", str(config), *args)
    assert result.returncode == 1
    key = "input.uri" if how == "--input" else "output.uri"
    assert f"{key}: credentials in the URI are not allowed" in result.stderr
    assert "://***@bucket/x" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert ACCESS_KEY not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_no_subprocess_goes_through_a_shell():
    sources = [p for package in ("jobs", "cluster", "rendering")
               for p in sorted(Path(REPO, package).glob("*.py"))]
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        for forbidden in ("shell=True", "os.system(", "os.popen(", "getoutput("):
            assert forbidden not in text, f"{path.name} uses {forbidden}"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny pipeline saved twice: with pickled (.bin) weights, and with code of its own."""
    from rendering.pipelines.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    pipe = build_tiny_pipeline("modelscope")
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    pipe.save_pretrained(root / "custom", safe_serialization=True)
    index_path = root / "custom" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = ["pipeline_evil", "EvilPipeline"]
    index_path.write_text(json.dumps(index))
    marker = root / "code-ran"
    (root / "custom" / "pipeline_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from diffusers import TextToVideoSDPipeline as EvilPipeline\n")
    return root, marker


def test_models_load_from_safetensors_only(tiny_folders):
    from rendering.pipelines.load import load_pipeline
    from rendering.contract import ModelSpec

    root, _ = tiny_folders
    with pytest.raises(OSError, match="safetensors"):
        load_pipeline(ModelSpec(str(root / "pickled")), "cpu")


def test_model_code_is_never_run(tiny_folders):
    from rendering.pipelines.load import load_pipeline
    from rendering.contract import ModelSpec

    root, marker = tiny_folders
    with pytest.raises(ValueError, match="custom code"):
        load_pipeline(ModelSpec(str(root / "custom")), "cpu")
    assert not marker.exists()
