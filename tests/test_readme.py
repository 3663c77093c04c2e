"""The README's code works as written: every Python block runs against a real rendered output with
WebDataset shards and yields its samples, every YAML block is a config `validate` accepts, every
JSON block parses, every shell block is valid shell naming configs that exist, and `make setup`
installs torch from where the README says."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, prompts, tiny_config, write_prompts
from helpers import read_manifest

from jobs import nightly
from jobs.config import validate
from jobs.driver import render

README = os.path.join(REPO, "README.md")
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _blocks(*tags: str) -> list[str]:
    """The body of every fenced block of the README tagged with one of ``tags``."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    fences = FENCE.findall(text)
    # A fence the pattern misses would shift every block after it: opening and closing fences pair.
    assert len(fences) * 2 == len(re.findall(r"^```", text, re.MULTILINE)), "unpaired ``` in README"
    return [body for tag, body in fences if tag in tags]


# ---------------------------------------------------------------------------------------------
# Python blocks: each is one of these readers, run as written in a fresh interpreter whose working
# directory holds the rendered output as `out/`; the code after it reports what the block built.

_REPORT = """
import hashlib as _hashlib, json as _json
def _sample(mp4, prompt, row_id):
    return [_hashlib.sha256(mp4).hexdigest(), prompt, row_id]
"""
READERS = {
    # what marks the block: the code that reports the samples its objects yield
    "wds.WebDataset(": _REPORT + """
_json.dump({"samples": [_sample(m, p, r["id"]) for m, p, r in loader],
            "last": _sample(mp4, prompt, row["id"]),  # the block's own loop ran to its end
            "workers": loader.num_workers, "shards": len(shards)}, open("result.json", "w"))
""",
    "datasets.load_dataset(": _REPORT + """
_json.dump({"samples": [_sample(r["mp4"]["bytes"], r["txt"], r["json"]["id"]) for r in ds],
            "last": _sample(sample["mp4"]["bytes"], sample["txt"], sample["json"]["id"]),
            "manifest": [r["id"] for r in manifest]}, open("result.json", "w"))
""",
}
ROWS = prompts(5) + [{"id": "blank", "prompt": "   "}]  # the blank prompt fails: listed, not packed


def _python_block(marker: str) -> str:
    found = [code for code in _blocks("python", "py") if marker in code]
    assert len(found) == 1, f"README: expected one python block with {marker!r}, found {len(found)}"
    return found[0]


def test_every_python_block_is_one_this_test_runs():
    for code in _blocks("python", "py"):
        assert len([m for m in READERS if m in code]) == 1, \
            f"a README python block this test does not run; add it to READERS:\n{code}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A folder holding `out/`: a rendered output packed into three WebDataset shards."""
    folder = tmp_path_factory.mktemp("readme")
    src = write_prompts(folder / "prompts.parquet", ROWS)
    render(validate(tiny_config(src, str(folder / "out"), cluster={"backend": "inline"},
                                output={"webdataset": {"rows_per_shard": 2}})), progress=False)
    tars = sorted(os.listdir(folder / "out" / "shards"))
    assert [t for t in tars if t.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    return str(folder)


def _expected(workdir: str) -> tuple[list[list], list[str]]:
    rows = read_manifest(os.path.join(workdir, "out"))
    ok = [[r["sha256"], r["prompt"], r["id"]] for r in rows if r["status"] == "ok"]
    assert len(ok) == 5 and len(rows) == 6
    return ok, [r["id"] for r in rows]


@pytest.mark.parametrize("marker", [pytest.param(m, id=m.rstrip("(")) for m in READERS])
def test_every_python_block_reads_the_shards_as_written(workdir, marker, tmp_path):
    code = _python_block(marker)
    script = tmp_path / "block.py"
    script.write_text(code + "\n" + READERS[marker])
    result = os.path.join(workdir, "result.json")
    if os.path.exists(result):
        os.remove(result)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    proc = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"the README block failed:\n{code}\n{proc.stderr[-3000:]}"
    with open(result) as f:
        got = json.load(f)
    ok, ids = _expected(workdir)
    assert sorted(got["samples"]) == sorted(ok)  # every ok row once: its video, prompt and id
    assert got["last"] in ok
    if marker == "wds.WebDataset(":
        assert got["shards"] == 3 and 1 <= got["workers"] <= 3  # never more workers than shards
    else:
        assert got["samples"] == ok  # datasets keeps input order
        assert got["manifest"] == ids


# ---------------------------------------------------------------------------------------------
# YAML blocks: full or partial job configs. A partial one is completed with an input, an output
# and a model where it names none; one that says it is a file of configs/ must agree with it.

def _yaml_blocks() -> list[str]:
    found = _blocks("yaml", "yml")
    assert found, "no ```yaml block found in README"
    return found


def _agrees(shown, actual, where: str = "") -> list[str]:
    """Where a value shown in the README differs from the file's (the README may show less)."""
    if isinstance(shown, dict) and isinstance(actual, dict):
        return [d for k, v in shown.items()
                for d in (_agrees(v, actual[k], f"{where}.{k}") if k in actual
                          else [f"{where}.{k}: not in the file"])]
    if isinstance(shown, list) and isinstance(actual, list) and len(shown) == len(actual):
        return [d for i, (a, b) in enumerate(zip(shown, actual))
                for d in _agrees(a, b, f"{where}.{i}")]
    return [] if shown == actual else [f"{where}: README {shown!r}, file {actual!r}"]


@pytest.mark.parametrize("block", _yaml_blocks(), ids=lambda b: b.strip().splitlines()[0][:30])
def test_every_yaml_block_is_a_config_validate_accepts(block, tmp_path):
    shown = yaml.safe_load(block)
    assert isinstance(shown, dict), block
    named = re.match(r"#\s*(configs/[\w.-]+\.ya?ml)", block.strip())
    if named:
        with open(os.path.join(REPO, named.group(1))) as f:
            assert _agrees(shown, yaml.safe_load(f)) == []
    cfg = copy.deepcopy(shown)
    cfg.setdefault("input", {}).setdefault("uri", str(tmp_path / "prompts.parquet"))
    cfg.setdefault("output", {}).setdefault("uri", str(tmp_path / "out"))
    if "model" not in cfg and "stages" not in cfg:
        cfg["model"] = {"path": "tiny:modelscope"}
    job = validate(cfg)
    if "{date" in job.output.uri:  # a nightly config: it must fill in a night
        night = nightly.for_night(job, dt.date(2026, 1, 5))
        assert "{" not in night.input.uri + night.output.uri


def test_every_json_block_parses():
    found = _blocks("json")
    assert found, "no ```json block found in README"
    for block in found:
        assert isinstance(json.loads(block), dict), block


def test_every_shell_block_parses_and_names_configs_that_exist():
    found = _blocks("bash", "sh", "shell")
    assert found, "no ```bash block found in README"
    for block in found:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, f"{proc.stderr}\n{block}"
    with open(README, encoding="utf-8") as f:
        named = set(re.findall(r"\bconfigs/[\w.-]+\.ya?ml\b", f.read()))
    assert named and not [p for p in named if not os.path.exists(os.path.join(REPO, p))]


# ---------------------------------------------------------------------------------------------
# make setup: torch from PyTorch's CPU index on a stock pip, from pip's own index where pip has one.

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


def _torch_install(tmp_path, env: dict, *args: str) -> str:
    """The torch line `make -n setup` prints for a fresh venv, under a pip set up only by env."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PIP_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL",
                                                       "TORCH_INDEX", "VENV", "PYTHON")}
    assert shutil.which("make"), "make is needed"
    proc = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={sys.executable}", *args],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "torch==" in line]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_make_setup_takes_cpu_torch_from_pytorchs_index_on_a_stock_pip(tmp_path):
    line = _torch_install(tmp_path, {"PIP_CONFIG_FILE": os.devnull})
    assert line.split()[-2:] == ["--index-url", CPU_INDEX]
    # the README's pin is the one installed
    pin = re.search(r"torch==([\w.+]+)", line).group(1)
    with open(os.path.join(REPO, "constraints.txt")) as f:
        assert f"torch=={pin}" in f.read().split()
    with open(README, encoding="utf-8") as f:
        assert set(re.findall(r"torch==([\w.+]*\w)", f.read())) == {pin}


@pytest.mark.parametrize("var", ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"])
def test_make_setup_leaves_torch_to_a_pip_configured_by_environment(tmp_path, var):
    line = _torch_install(tmp_path, {"PIP_CONFIG_FILE": os.devnull, var: "file:///srv/mirror"})
    assert "--index-url" not in line and "download.pytorch.org" not in line


def test_make_setup_leaves_torch_to_a_pip_configured_by_its_config_file(tmp_path):
    conf = tmp_path / "config" / "pip" / "pip.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[global]\nextra-index-url = https://pypi.mirror.example/simple\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}  # the user's pip.conf
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, env={**{k: v for k, v in os.environ.items()
                                               if not k.startswith("PIP_")}, **env})
    assert "pypi.mirror.example" in listed.stdout  # pip reads the file
    line = _torch_install(tmp_path, env)
    assert "--index-url" not in line and "download.pytorch.org" not in line


def test_make_setup_torch_index_overrides_the_choice(tmp_path):
    configured = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "/srv/wheels"}
    cuda = _torch_install(tmp_path, configured, f"TORCH_INDEX={CUDA_INDEX}")
    assert cuda.split()[-2:] == ["--index-url", CUDA_INDEX]
    default = _torch_install(tmp_path, {"PIP_CONFIG_FILE": os.devnull}, "TORCH_INDEX=")
    assert "--index-url" not in default and "download.pytorch.org" not in default


def test_the_metrics_table_lists_every_metric_as_declared():
    """The metrics are a contract: the README's table has each name, type and labels as
    ``jobs.run.metrics`` declares them, in order."""
    from jobs.run.metrics import METRICS

    with open(README, encoding="utf-8") as f:
        text = f.read()
    table = text.split("| metric (as Prometheus sees it) | type | labels | meaning |\n")[1]
    rows = [line.split(" | ") for line in table.split("\n\n")[0].splitlines()[1:]]
    shown = [(name.strip("| `"), kind, tuple(re.findall(r"`(\w+)`", labels)))
             for name, kind, labels, _ in rows]
    assert shown == [(f"ray_{m.name}", m.kind, m.labels) for m in METRICS]
