"""A text stage leading a job: a causal LM rewrites each row's prompt, then the image and video
stages render the rewrite. On real Ray with the tiny models: every row rendered and both prompts
recorded, a rerun byte-identical, the cache's hits, variations exactly once across a driver's
SIGKILL, a repair of a derived row, the fallbacks of a poisoned rewrite, and (on a GPU) a vLLM
rewrite recorded as a transformers one."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from helpers import CliDriver, by_id, committed_shards, prompts, read_manifest, run_cli
from helpers import stages_config, wait_for, write_config, write_prompts

from jobs.config import validate
from jobs.driver import render
from jobs.verify import verify

pytestmark = pytest.mark.slow  # whole jobs on Ray


def text_config(src: str, out: str, *, text: dict | None = None, video: str = "tiny:ltx-i2v",
                keyframe: str | None = "tiny:sd", rewrite_model: str = "tiny:lm",
                **sections) -> dict:
    """A tiny job led by a text stage: rewrite -> keyframe -> video (or rewrite -> video)."""
    cfg = stages_config(src, out, keyframe=keyframe or "tiny:sd", video=video, **sections)
    if keyframe is None:
        cfg["stages"] = cfg["stages"][1:]
    else:  # three stages on a 2-CPU machine: the first two share a CPU
        cfg["stages"][0]["resources"] = {"cpus": 0.5}
    cfg["stages"].insert(0, {"name": "rewrite", "model": {"path": rewrite_model},
                             "text": {"max_new_tokens": 16, "target_words": 20, **(text or {})},
                             "resources": {"cpus": 0.5}})
    return cfg


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _stored(out) -> dict[str, str]:
    """Every object a row stored, by its path under the output: its sha256."""
    return {a["path"]: _sha256(os.path.join(out, a["path"]))
            for row in read_manifest(out) for a in row["artifacts"]}


def test_a_three_stage_job_renders_the_rewrites_records_both_prompts_and_reruns_the_same(
        tmp_path, ray_local):
    rows = prompts(5) + [{"id": "again", "prompt": "a small test scene number 1"}]
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    first, second = tmp_path / "first", tmp_path / "second"
    summary = render(validate(text_config(src, str(first))), progress=False)
    assert (summary.ok, summary.failed, summary.rendered) == (6, 0, 6)
    manifest = by_id(read_manifest(first))
    for row in rows:
        got = manifest[row["id"]]
        assert got["status"] == "ok" and got["prompt"] == row["prompt"]
        assert got["rewritten_prompt"] and got["rewritten_prompt"] != row["prompt"]
        assert got["rewrite_model"] == "tiny:lm" and got["rewrite_fallback"] is None
        assert [s["name"] for s in got["stages"]] == ["rewrite", "keyframe", "video"]
        artifacts = {a["name"]: a for a in got["artifacts"]}
        assert list(artifacts) == ["rewrite", "keyframe", "video"]
        assert artifacts["rewrite"]["kind"] == "text"
        stored = json.loads((first / artifacts["rewrite"]["path"]).read_text())
        assert stored["rewritten_prompt"] == got["rewritten_prompt"]
        assert stored["system_prompt_sha256"] == got["rewrite_system_prompt_sha256"]
    # The repeated prompt was generated once: one of its rows is the cache's.
    assert sorted(manifest[i]["rewrite_cache_hit"] for i in ("row-001", "again")) == [False, True]
    assert manifest["again"]["rewritten_prompt"] == manifest["row-001"]["rewritten_prompt"]
    assert verify(str(first)).problems == []
    figures = json.loads((first / "job.json").read_text())["last_run"]["stages"]
    assert figures["rewrite"]["made"] == 6 and figures["rewrite"]["cache_hits"] == 1

    # The same config and input into another output: the same bytes, stage by stage.
    render(validate(text_config(src, str(second))), progress=False)
    assert _stored(second) == _stored(first)
    assert read_manifest(second, shards=False) and \
        [r["rewritten_prompt"] for r in read_manifest(second)] == \
        [r["rewritten_prompt"] for r in read_manifest(first)]


def test_repeated_prompts_are_generated_once_each_and_a_rerun_hits_the_cache(tmp_path, ray_local):
    distinct = [f"scene {word}" for word in ("fox", "cat", "owl", "deer")]
    rows = [{"id": f"r{i:02d}", "prompt": distinct[i % 4]} for i in range(12)]
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    cache = tmp_path / "shared-cache"  # a cache several outputs share
    cfg = text_config(src, str(tmp_path / "a"), keyframe=None, video="tiny:ltx",
                      text={"cache_uri": str(cache)}, render={"num_frames": 9},
                      output={"shard_size": 3})
    render(validate(cfg), progress=False)
    manifest = read_manifest(tmp_path / "a")
    hits = [r["rewrite_cache_hit"] for r in manifest]
    assert hits.count(False) == 4 and hits.count(True) == 8  # one generation per distinct prompt
    assert len(list(cache.glob("*.json"))) == 4
    by_prompt = {}
    for row in manifest:
        by_prompt.setdefault(row["prompt"], set()).add(row["rewritten_prompt"])
    assert all(len(texts) == 1 for texts in by_prompt.values())
    shown = run_cli("status", str(tmp_path / "a")).stdout
    assert "  rewrite: 12 made, 0 failed, " in shown and ", 8 of 12 from the cache" in shown

    # Another output over the same cache generates nothing; a damaged entry is made again.
    entry = sorted(cache.glob("*.json"))[0]
    entry.write_text(entry.read_text().replace('"text": "', '"text": "tampered '))
    cfg["output"]["uri"] = str(tmp_path / "b")
    render(validate(cfg), progress=False)
    again = read_manifest(tmp_path / "b")
    assert [r["rewrite_cache_hit"] for r in again].count(False) == 1
    assert [r["rewritten_prompt"] for r in again] == [r["rewritten_prompt"] for r in manifest]
    assert "tampered" not in entry.read_text()


def _forced_lm(folder, token: str) -> str:
    """A tiny LM folder whose model writes ``token`` at every step (its end token: nothing)."""
    import torch

    from rendering.text import tiny

    model, tokenizer = tiny.build_tiny_lm()
    with torch.no_grad():  # every position's state is e_0; only token's logit is above 0
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tiny.vocabulary()[token], 0] = 1.0
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("token, reason", [("<|im_end|>", "empty"), ("fox", "too_long")])
def test_a_poisoned_rewrite_falls_back_to_the_rows_own_prompt(tmp_path, ray_local, token, reason):
    """An empty rewrite, and one over the video model's prompt limit (LTX reads 128 tokens;
    64 words of the tiny T5 take about 200) with no sentence to trim it to, render the row's
    own prompt, the reason recorded."""
    src = write_prompts(tmp_path / "prompts.parquet", prompts(2))
    cfg = text_config(src, str(tmp_path / "out"), keyframe=None, video="tiny:ltx",
                      rewrite_model=_forced_lm(tmp_path / "lm", token),
                      text={"max_new_tokens": 64}, render={"num_frames": 9})
    summary = render(validate(cfg), progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    for row in read_manifest(tmp_path / "out"):
        assert (row["rewrite_fallback"], row["rewritten_prompt"]) == (reason, row["prompt"])
        assert row["prompt_truncated"] is False  # judged on the text the video stage got
        stored = json.loads((tmp_path / "out" / row["artifacts"][0]["path"]).read_text())
        assert stored["generated"] == (("fox " * 64).strip() if token == "fox" else "")
    assert verify(str(tmp_path / "out")).problems == []


def test_a_rewrite_that_is_not_text_fails_its_row_when_asked_to(tmp_path):
    """``on_bad_rewrite: fail``: no stage after the text stage renders the row."""
    src = write_prompts(tmp_path / "prompts.parquet", prompts(2))
    cfg = text_config(src, str(tmp_path / "out"), keyframe=None, video="tiny:ltx",
                      rewrite_model=_forced_lm(tmp_path / "lm", ","),
                      text={"on_bad_rewrite": "fail"}, render={"num_frames": 9},
                      cluster={"backend": "inline"})
    summary = render(validate(cfg), progress=False)
    assert (summary.ok, summary.failed) == (0, 2)
    for row in read_manifest(tmp_path / "out"):
        assert (row["error_code"], row["failed_stage"], row["rewrite_fallback"]) == (
            "invalid_rewrite", "rewrite", "not_text")
        assert row["error"] == "invalid_rewrite: the rewrite is not text (on_bad_rewrite: fail)"
        assert row["artifacts"] == [] and [s["name"] for s in row["stages"]] == ["rewrite"]


def test_variations_make_three_rows_of_each_exactly_once_across_a_driver_sigkill_and_repair(
        tmp_path, ray_local):
    out = tmp_path / "out"
    rows = prompts(6)
    src = write_prompts(tmp_path / "prompts.parquet", rows)
    cfg = text_config(src, str(out), keyframe=None, video="tiny:ltx",
                      render={"num_frames": 9, "num_inference_steps": 4},
                      text={"variations": 3, "temperature": 1.0}, output={"shard_size": 2})
    config = write_config(tmp_path, cfg)
    plan = run_cli("plan", config)
    assert plan.returncode == 0, plan.stderr
    assert "rows:       18 (3 variations of each input row)" in plan.stdout

    with CliDriver("render", config, "--quiet") as driver:
        wait_for(lambda: len(committed_shards(out)) >= 2, 240, "two committed shards", driver)
        driver.kill_hard()
    before = by_id(read_manifest(out, shards=True))
    assert 4 <= len(before) < 18
    summary = render(validate(cfg), progress=False)  # the resume, on this session's cluster
    assert (summary.ok, summary.skipped, summary.complete) == (18, len(before), True)
    manifest = read_manifest(out)
    ids = [f"{r['id']}.v{k}" for r in rows for k in range(3)]
    assert [r["id"] for r in manifest] == ids  # in input order, every one once
    assert [r["variation"] for r in manifest] == [0, 1, 2] * 6
    assert [r["source_id"] for r in manifest] == [r["id"] for r in rows for _ in range(3)]
    assert len({r["seed"] for r in manifest}) == 18
    for i in range(6):  # distinct rewrites of one prompt
        texts = {r["rewritten_prompt"] for r in manifest[3 * i:3 * i + 3]}
        assert len(texts) == 3 and {r["prompt"] for r in manifest[3 * i:3 * i + 3]} == \
            {rows[i]["prompt"]}
    assert run_cli("verify", str(out)).returncode == 0  # no row committed twice

    # A derived row's lost video is rendered again; its rewrite is taken up, not made again.
    row = by_id(manifest)["row-004.v1"]
    os.remove(out / row["video_uri"])
    rewrite = next(a for a in row["artifacts"] if a["name"] == "rewrite")
    made = os.path.getmtime(out / rewrite["path"])
    render(validate(cfg), progress=False, redo=frozenset({"damaged"}))
    again = by_id(read_manifest(out))["row-004.v1"]
    assert again["redo_of"] is not None and again["sha256"] == row["sha256"]
    assert again["rewritten_prompt"] == row["rewritten_prompt"]
    assert os.path.getmtime(out / rewrite["path"]) == made
    stages = json.loads((out / "job.json").read_text())["last_run"]["stages"]
    assert (stages["rewrite"]["recovered"], stages["rewrite"]["made"]) == (1, 0)
    assert stages["video"]["made"] == 1
    assert run_cli("verify", str(out)).returncode == 0


@pytest.mark.gpu
def test_a_vllm_rewrite_is_recorded_as_a_transformers_one(tmp_path):
    """The same greedy three-stage job in this process on the GPU, on each engine: every row's
    rewrite is recorded the same way (the same manifest columns, the same text), and the vLLM
    rewrite's artifact names its engine."""
    pytest.importorskip("vllm")
    src = write_prompts(tmp_path / "prompts.parquet", prompts(3))
    manifests = {}
    for engine in ("transformers", "vllm"):
        cfg = text_config(src, str(tmp_path / engine), text={"engine": engine},
                          cluster={"backend": "inline"})
        cfg["stages"][0]["resources"]["gpus"] = 0.3  # vLLM's share: the other stages use the rest
        summary = render(validate(cfg), progress=False)
        assert (summary.ok, summary.failed) == (3, 0)
        assert verify(str(tmp_path / engine)).problems == []
        manifests[engine] = by_id(read_manifest(tmp_path / engine))
    columns = ("prompt", "rewritten_prompt", "rewrite_model", "rewrite_system_prompt_sha256",
               "rewrite_fallback")
    for row_id, row in manifests["vllm"].items():
        other = manifests["transformers"][row_id]
        assert [row[c] for c in columns] == [other[c] for c in columns]
        made, made_before = (json.loads((tmp_path / engine / r["artifacts"][0]["path"]).read_text())
                             for engine, r in (("vllm", row), ("transformers", other)))
        assert made.pop("engine") == "vllm" and "engine" not in made_before
        assert made.pop("cache_key") != made_before.pop("cache_key")
        assert made == made_before
