"""Small frictions users met, each fixed where they met it: misspelled columns and keys, stray
objects, silent or unlabelled status lines, unexplained invalid rows, a gallery without the
input images, the license warning on install, a missing hub model, and exit 3 under schedulers."""

from __future__ import annotations

import base64
import html.parser
import http.server
import io
import logging
import os
import shutil
import subprocess
import sys
import threading

import media_corpus as corpus
import pytest
from helpers import REPO, free_port, prompts, run_cli, stages_config, tiny_config, write_prompts
from helpers import read_manifest, write_config

from jobs.store import lease
from jobs.verify import verify
from jobs.cli import main
from jobs.config import ConfigError, validate
from jobs.input.dataset import open_dataset
from jobs.driver import render
from jobs.store.hashset import HashSet
from jobs.input.plan import INVALID_EXAMPLES, PlanCounts, count_plan, plan_rows
from jobs.products.report.media import THUMB_PX
from jobs.products.report.page import write_report
from jobs.input.rows import RowFailure


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
    """A finished output of 5 rows in 2 shards, every row ok (rendered in this process)."""
    folder = tmp_path_factory.mktemp("finished")
    src = write_prompts(folder / "in.parquet", prompts(5))
    out = str(folder / "out")
    render(validate(tiny_config(src, out, cluster={"backend": "inline"})), progress=False)
    return out


# --- 1. Misspelled input columns and config keys --------------------------------------------------

def _planned_warnings(src: str, carry: list[str], caplog) -> list[str]:
    """The warnings of opening and planning the input, as a job does."""
    caplog.clear()
    cfg = validate(tiny_config(src, "out", input={"carry_columns": carry}))
    with caplog.at_level(logging.WARNING, logger="jobs"):
        count_plan(open_dataset(src, carry), cfg, HashSet())
    return [r.getMessage() for r in caplog.records]


def test_an_unknown_input_column_is_named_once_with_the_known_one_it_is_close_to(tmp_path, caplog):
    rows = [{"id": f"r{i}", "prompt": "p", "num_frame": 12, "source": "web", "notes": "x"}
            for i in range(2)]
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):  # two files: one job, one warning
        write_prompts(tmp_path / "in" / f"{name}.parquet", rows)
    [warning] = _planned_warnings(str(tmp_path / "in"), ["source"], caplog)
    assert "'num_frame' (did you mean num_frames?)" in warning
    assert "'notes'" in warning and "source" not in warning
    assert "input.carry_columns" in warning
    assert _planned_warnings(str(tmp_path / "in"), ["source", "notes", "num_frame"], caplog) == []


def test_an_unknown_config_key_suggests_the_close_key_of_its_section(tmp_path):
    base = tiny_config("in.parquet", "out")
    with pytest.raises(ConfigError, match=r"^render\.num_frame: unknown key; did you mean "
                                          r"render\.num_frames\?$"):
        validate({**base, "render": {"num_frame": 12}})
    with pytest.raises(ConfigError, match=r"did you mean stages\.0\.render\.guidance_scale\?"):
        cfg = stages_config("in.parquet", "out")
        cfg["stages"][0]["render"] = {"guidance_scal": 5.0}
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^rendr: unknown key; did you mean render\?$"):
        validate({**base, "rendr": {}})
    with pytest.raises(ConfigError, match=r"^render\.zzz: unknown key$"):
        validate({**base, "render": {"zzz": 1}})


# --- 2. verify --remove-strays --------------------------------------------------------------------

@pytest.fixture
def with_strays(finished, tmp_path):
    """A copy of the finished output with a stray video, a temp upload and a temp manifest."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    strays = [out / "videos" / "stranger.mp4", out / "videos" / ".tmp-upload-1",
              out / "manifests" / ".tmp-shard"]
    for path in strays:
        path.write_bytes(b"not ours")
    return out, strays


def _listed(out) -> list[str]:
    return [os.path.join(out, r["video_uri"]) for r in read_manifest(out)]


def test_remove_strays_lists_by_default_and_deletes_only_strays_with_yes(with_strays, capsys):
    out, strays = with_strays
    assert main(["verify", str(out), "--remove-strays"]) == 1
    listed = capsys.readouterr().out
    assert all(f"would remove {path}" in listed for path in strays)
    assert "3 stray object(s) would be removed: add --yes" in listed
    assert all(path.exists() for path in strays)

    assert main(["verify", str(out), "--remove-strays", "--yes"]) == 0
    assert "removed 3 stray object(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in strays)
    assert all(os.path.exists(path) for path in _listed(out))
    assert verify(str(out)).problems == []
    assert lease.holder(str(out)) is None  # the lease it held is released

    assert main(["verify", str(out), "--yes"]) == 2


def test_remove_strays_is_refused_while_a_run_holds_the_output_or_receipts_wait(with_strays,
                                                                               capsys):
    out, strays = with_strays
    with lease.acquire(str(out)):
        assert main(["verify", str(out), "--remove-strays", "--yes"]) == 1
    assert "in use by another reelfarm run" in capsys.readouterr().err

    (out / "receipts").mkdir()
    (out / "receipts" / "stranger.json").write_text("{}")
    for flags in ([], ["--yes"]):
        assert main(["verify", str(out), "--remove-strays", *flags]) == 1
        assert "rerun the job to commit them" in capsys.readouterr().err
    assert all(path.exists() for path in strays)


# --- 3, 4. status ---------------------------------------------------------------------------------

def test_status_failed_says_when_there_are_none(finished, capsys):
    assert main(["status", finished, "--failed"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"{finished}: no failed rows" in captured.err


def test_status_labels_the_rate_as_over_rendering_time_as_the_report_does(finished, capsys):
    assert main(["status", finished]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("last run")]
    assert "videos/hour, rendering time only: start-up of " in last[0]
    assert last[0].endswith(" s left out)")


# --- 5. plan names its invalid rows ---------------------------------------------------------------

def test_plan_shows_the_first_invalid_rows_with_their_errors(tmp_path, capsys):
    rows = [{**row, "num_frames": None} for row in prompts(12)]
    rows[1]["prompt"] = " "
    rows[3]["id"] = "row-000"  # a repeat
    rows[6]["num_frames"] = 0
    rows[8]["prompt"] = None
    rows[9]["id"] = "row-002"
    rows[10]["num_frames"] = 4096
    rows[11]["prompt"] = ""
    src = write_prompts(tmp_path / "in.parquet", rows)
    cfg = validate(tiny_config(src, str(tmp_path / "out"), input={"batch_rows": 4}))
    dataset = open_dataset(src, [])
    counts, streamed = count_plan(dataset, cfg, HashSet()), PlanCounts()
    resolved = [(p.id, p.outcome.error) for p in plan_rows(dataset, cfg, HashSet(), streamed)
                if isinstance(p.outcome, RowFailure)]
    assert counts.invalid == len(resolved) == 7
    assert counts.invalid_examples == streamed.invalid_examples == resolved[:INVALID_EXAMPLES]
    assert [code.split(":")[0] for _, code in counts.invalid_examples] == [
        "invalid_prompt", "duplicate_id", "invalid_value", "invalid_prompt", "duplicate_id"]

    config = write_config(tmp_path, tiny_config(src, str(tmp_path / "out")))
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "invalid:    'row-001': invalid_prompt: prompt is null, empty or blank" in out
    assert "invalid:    'row-006': invalid_value: num_frames must be >= 1, got 0" in out
    assert "... and 2 more" in out


# --- 6. The gallery shows input images and keyframes ----------------------------------------------

class _Images(html.parser.HTMLParser):
    """The attributes of every ``img`` of a page, as a browser's parser reads them."""

    def __init__(self, text: str):
        super().__init__()
        self.found: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.found.append(dict(attrs))


def _gallery_images(out: str) -> list[tuple[str, str]]:
    """(alt, src) of every image of the written report's gallery."""
    with open(write_report(out), encoding="utf-8") as f:
        text = f.read()
    gallery = text[text.index('id="gallery"'):text.index('id="failures"')]
    return [(attrs["alt"], attrs["src"]) for attrs in _Images(gallery).found]


def test_the_gallery_shows_each_rows_input_image_inline_beside_its_video(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    corpus.good_png(data, size=(64, 32))
    corpus.good_png(data, size=(64, 32), name="changed.png")
    rows = [{"id": "a", "prompt": "p", "image": "good.png"},
            {"id": "b", "prompt": "p", "image": "changed.png"}]
    src = write_prompts(data / "prompts.parquet", rows)
    out = str(tmp_path / "out")
    render(validate(tiny_config(src, out, model={"path": "tiny:svd"},
                                render={"num_frames": 2, "height": 32, "width": 64},
                                cluster={"backend": "inline", "num_workers": 1})), progress=False)
    corpus.good_png(data, size=(48, 32), name="changed.png")  # no longer what was rendered

    [(alt, uri)] = _gallery_images(out)
    assert alt == "input image" and uri.startswith("data:image/jpeg;base64,")
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumbnail.size == (THUMB_PX, THUMB_PX // 2)  # the row's 64x32, scaled down


def test_the_gallery_shows_a_stage_keyframe_beside_its_video(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", prompts(2))
    out = str(tmp_path / "out")
    render(validate(stages_config(src, out, render={"height": 32, "width": 32},
                                  cluster={"backend": "inline"})), progress=False)
    images = _gallery_images(out)
    assert len(images) == 2
    assert all(alt == "keyframe" and src.startswith("stages/keyframe/") and src.endswith(".png")
               and os.path.exists(os.path.join(out, src)) for alt, src in images)


# --- 7. The license -------------------------------------------------------------------------------

def test_the_wheel_builds_without_a_warning_and_holds_every_package(tmp_path):
    import zipfile

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(open(os.path.join(REPO, "pyproject.toml")).read())
    assert project["project"]["license"] == "Apache-2.0"
    [setuptools] = [Requirement(r) for r in project["build-system"]["requires"]]
    assert "76.0" not in setuptools.specifier  # the string form needs setuptools 77

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    packages = set()
    for top in ("jobs", "cluster", "rendering"):
        shutil.copytree(os.path.join(REPO, top), source / top,
                        ignore=shutil.ignore_patterns("__pycache__"))
        packages |= {os.path.relpath(folder, source) for folder, _, files in os.walk(source / top)
                     if "__init__.py" in files}
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c", "from setuptools import build_meta as b; "
         f"print(b.build_wheel({str(tmp_path)!r}))"],
        cwd=source, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "project.license" not in build.stderr
    with zipfile.ZipFile(tmp_path / build.stdout.split()[-1]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    # Every package, subpackages included: an installed (not editable) reelfarm is whole.
    assert {os.path.dirname(n) for n in names if n.endswith("/__init__.py")} == packages
    assert len(packages) > 10


# --- 8. A hub model that cannot be had ------------------------------------------------------------

def _hub(status: int, error_code: str) -> http.server.HTTPServer:
    """A stand-in for the hub's API that answers every request with ``status``."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("answer, words", [
    ((404, "RepoNotFound"), "was not found on the hub: check model.path"),
    ((403, "GatedRepo"), "is gated on the hub: accept its terms there, then set HF_TOKEN"),
    (None, "the hub did not answer (ConnectError"),
])
def test_a_hub_model_that_cannot_be_fetched_says_why_in_one_line(tmp_path, answer, words):
    server = _hub(*answer) if answer else None
    port = server.server_address[1] if server else free_port()
    config = write_config(tmp_path, rows=prompts(1), model={"path": "nobody/no-such-model"},
                          cluster={"backend": "inline"})
    try:
        result = run_cli("render", str(config), "--quiet",
                         env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "",
                              "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""})
    finally:
        if server:
            server.shutdown()
    [line] = [x for x in result.stderr.splitlines() if x.startswith("reelfarm:")]
    assert result.returncode == 1
    assert line.startswith("reelfarm: model 'nobody/no-such-model' ") and words in line, line
    assert line.endswith("; --debug shows the traceback") and "stacktrace" not in line


# --- 9. Exit 0 for schedulers when rows failed ----------------------------------------------------

def test_ok_if_rows_failed_turns_exit_3_into_0_and_still_lists_the_failures(tmp_path, capsys):
    rows = prompts(2) + [{"id": "blank", "prompt": "  "}]
    config = write_config(tmp_path, rows=rows, cluster={"backend": "inline"})
    assert main(["render", str(config), "--quiet", "--ok-if-rows-failed"]) == 0
    assert "1 failed with invalid_prompt" in capsys.readouterr().out
    assert main(["render", str(config), "--quiet"]) == 3  # the same output, without the flag

    (tmp_path / "prompts").mkdir()
    write_prompts(tmp_path / "prompts" / "2026-01-05.parquet", rows)
    night = write_config(tmp_path, tiny_config(str(tmp_path / "prompts" / "{date}.parquet"),
                                               str(tmp_path / "renders" / "{date}"),
                                               cluster={"backend": "inline"}),
                         name="nightly.yaml")
    assert main(["nightly", str(night), "--date", "2026-01-05", "--quiet",
                 "--ok-if-rows-failed"]) == 0
    assert "complete_with_failures" in capsys.readouterr().out
    assert main(["nightly", str(night), "--date", "2026-01-05", "--quiet"]) == 3
