"""A text stage's config, its rows and its tasks, without Ray: what is refused in one line,
what the fingerprint covers, how variations make rows (ids, seeds, resume), how the stage after
a text stage takes the rewrite as its prompt, what plan counts, and a vLLM engine where vllm
is not installed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml
from helpers import run_cli, write_prompts

from jobs.config import ConfigError, fingerprint, load_config, validate
from jobs.input.dataset import open_dataset
from jobs.input.plan import PlanCounts, count_plan, plan_rows
from jobs.input.preflight import preflight
from jobs.input.rows import row_seed, variant_id
from jobs.stages import job_stages
from jobs.store.hashset import HashSet, row_hash
from rendering.contract import Artifact, Result


def config(tmp_path, text: dict | None = None, **extra) -> dict:
    return {"input": {"uri": str(tmp_path / "in.parquet")},
            "output": {"uri": str(tmp_path / "out")},
            "render": {"num_frames": 9, "height": 32, "width": 32},
            "stages": [{"name": "rewrite", "model": {"path": "tiny:lm"}, "text": text or {}},
                       {"name": "video", "model": {"path": "tiny:ltx"}}], **extra}


@pytest.mark.parametrize("change, message", [
    (lambda c: c["stages"].reverse(), "stages.rewrite: a text stage must lead stages:"),
    (lambda c: c["stages"].pop(), "stages.rewrite: a text stage must lead stages:"),
    (lambda c: c["stages"][1]["model"].update(path="tiny:lm"),
     "stages.video.model: tiny:lm is a language model: only a text stage"),
    (lambda c: c["stages"][0]["model"].update(path="tiny:sd"),
     "stages.rewrite.model: tiny:sd is a diffusers pipeline"),
    (lambda c: c["stages"][0]["model"].update(pipeline="LTXPipeline"),
     "stages.rewrite.model: a text stage's model takes path, revision and dtype only"),
    (lambda c: c["stages"][0].update(render={"guidance_scale": 2.0}),
     "stages.rewrite: a text stage renders nothing"),
    (lambda c: c["stages"][0]["text"].update(variations=3),
     "stages.0.text: variations > 1 needs sampling"),
    (lambda c: c["stages"][0]["text"].update(tempreature=1),
     "stages.0.text.tempreature: unknown key; did you mean stages.0.text.temperature?"),
    (lambda c: c["stages"][0]["text"].update(system_prompt="/no/such/file.txt"),
     "stages.0.text.system_prompt: cannot read the system prompt file /no/such/file.txt"),
    (lambda c: c["stages"][0]["text"].update(on_bad_rewrite="ignore"),
     "stages.0.text.on_bad_rewrite: Input should be 'fallback' or 'fail'"),
    (lambda c: c["stages"][0]["model"].update(path="/no/such/lm"),
     "stages.rewrite.model.path: /no/such/lm is not a transformers model folder"),
    (lambda c: c["stages"][0]["text"].update(engine="vllm") or c.update(
        cluster={"gpus_per_worker": 0}),
     "stages.rewrite.text.engine: vllm needs a GPU, and cluster.gpus_per_worker: 0 gives the "
     "workers none"),
    (lambda c: c["stages"][0]["text"].update(engine="vllm") or c["stages"][0].update(
        resources={"gpus": 2}),
     "stages.rewrite.text.engine: vllm runs on one GPU or a share of one, and resources.gpus "
     "is 2"),
    (lambda c: c["stages"][0]["text"].update(engine="sglang"),
     "stages.0.text.engine: Input should be 'transformers' or 'vllm'"),
])
def test_text_stage_configs_that_cannot_work_are_refused_in_one_line(tmp_path, change, message):
    cfg = config(tmp_path)
    change(cfg)
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert str(refused.value).startswith(message)


def test_the_fingerprint_covers_what_changes_a_rewrite_and_not_what_changes_its_speed(tmp_path):
    own = tmp_path / "system.txt"
    own.write_text("Say it in {words} words.")
    base = fingerprint(validate(config(tmp_path, {"system_prompt": str(own)})))
    for change in ({"batch_size": 4}, {"cache_uri": str(tmp_path / "cache")},
                   {"engine": "transformers"}):
        assert fingerprint(validate(config(tmp_path, {"system_prompt": str(own), **change}))) \
            == base
    for change in ({"target_words": 40}, {"temperature": 0.5}, {"max_new_tokens": 12},
                   {"system_prompt": "i2v"}, {"on_bad_rewrite": "fail"}, {"engine": "vllm"}):
        assert fingerprint(validate(config(tmp_path, {"system_prompt": str(own), **change}))) \
            != base
    own.write_text("Say it in {words} words, please.")  # the file's text, not its name
    assert fingerprint(validate(config(tmp_path, {"system_prompt": str(own)}))) != base


def test_a_text_stage_keeps_the_fingerprint_it_had_before_it_could_choose_an_engine(tmp_path):
    # As the code before text.engine computed it: outputs made then resume.
    assert fingerprint(validate(config(tmp_path))) == "82e436a3493225ed"
    assert validate(config(tmp_path, {"engine": "vllm"})).stages[0].text.engine == "vllm"


def test_a_vllm_stage_on_a_worker_without_vllm_stops_the_job_saying_how_to_install_it(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    write_prompts(tmp_path / "in.parquet", [{"id": "a", "prompt": "a fox"}])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, {"engine": "vllm"},
                                          cluster={"backend": "inline"})))
    result = run_cli("render", str(path))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "reelfarm: text.engine: vllm needs the vllm package, which this worker cannot import "
        "(No module named 'vllm'): install reelfarm's vllm extra on the GPU machines (pip "
        "install -e '.[vllm]' in its folder; it brings its own CUDA build of torch), or set "
        "text.engine: transformers")


def test_a_system_prompt_file_in_a_config_resolves_against_the_configs_folder(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mine.txt").write_text("Write {words} words.")
    cfg = config(tmp_path, {"system_prompt": "./mine.txt"})
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "jobs" / "job.yaml")
    assert loaded.stages[0].text.system_prompt == str(tmp_path / "jobs" / "mine.txt")


def test_the_stage_after_a_text_stage_renders_the_rewrite_and_takes_no_input(tmp_path):
    cfg = validate(config(tmp_path))
    rewrite, video = job_stages(cfg)
    assert (rewrite.artifact, rewrite.folder, rewrite.receipts_folder, rewrite.batch_size) == \
        ("rewrite", "stages/rewrite", "receipts/rewrite", 16)
    assert video.takes == "rewrite"
    write_prompts(tmp_path / "in.parquet", [{"id": "a", "prompt": "a fox"}])
    task = next(plan_rows(open_dataset(str(tmp_path / "in.parquet"), []), cfg, HashSet(),
                          PlanCounts())).outcome
    assert rewrite.task(task, []) is task and rewrite.size(task) == (None, None)
    text = Artifact("rewrite", "stages/rewrite/a.json", 10, "ab" * 32, "text")
    rendered = video.task(task, [Result("a", True, [text],
                                        metrics={"rewritten_prompt": "A red fox runs."})])
    assert rendered.prompt == "A red fox runs." and rendered.inputs == {}
    assert (rendered.id, rendered.seed, rendered.params) == (task.id, task.seed, task.params)


ROWS = [{"id": "a", "prompt": "a fox", "seed": None}, {"id": "b", "prompt": "an owl", "seed": 7},
        {"id": "a", "prompt": "again", "seed": None}, {"id": "c", "prompt": " ", "seed": None}]


def test_variations_make_k_rows_of_each_input_row_with_ids_and_seeds_of_their_own(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ROWS)
    cfg = validate(config(tmp_path, {"variations": 3, "temperature": 0.8}))
    counts = PlanCounts()
    planned = list(plan_rows(open_dataset(src, []), cfg, HashSet(), counts))
    assert [p.id for p in planned] == [variant_id(r["id"], k) for r in ROWS for k in range(3)]
    assert [p.index for p in planned] == list(range(12))
    assert [(p.source_id, p.variation) for p in planned[:3]] == [("a", 0), ("a", 1), ("a", 2)]
    assert [p.outcome.seed for p in planned[:3]] == [row_seed(0, f"a.v{k}") for k in range(3)]
    assert [p.outcome.seed for p in planned[3:6]] == [row_seed(7, f"b.v{k}") for k in range(3)]
    assert {p.prompt for p in planned[3:6]} == {"an owl"}
    # A repeated id repeats each of its variations; a blank prompt fails each of its rows.
    assert [p.occurrence for p in planned[6:9]] == [1, 1, 1]
    assert [p.outcome.error_code for p in planned[6:]] == ["duplicate_id"] * 3 + \
        ["invalid_prompt"] * 3
    assert (counts.rows, counts.todo, counts.invalid, counts.duplicates) == (12, 12, 6, 3)
    # plan counts them the same; committed rows are done, one variation at a time.
    assert count_plan(open_dataset(src, []), cfg, HashSet(), preflight(cfg)) == counts
    committed = HashSet()
    committed.add([row_hash("a.v1"), row_hash("b.v0"), row_hash("a.v0", 1)])
    again = PlanCounts()
    left = list(plan_rows(open_dataset(src, []), cfg, committed, again))
    assert [(p.id, p.occurrence) for p in left[:6]] == [
        ("a.v0", 0), ("a.v2", 0), ("b.v1", 0), ("b.v2", 0), ("a.v1", 1), ("a.v2", 1)]
    assert (again.done, again.todo) == (3, 9)
    assert [p.index for p in left][:2] == [0, 2]  # row_index stays the row's own
    assert count_plan(open_dataset(src, []), cfg, committed, preflight(cfg)) == again


def test_one_variation_is_the_row_itself(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ROWS[:2])
    cfg = validate(config(tmp_path, {"temperature": 0.8}))
    planned = list(plan_rows(open_dataset(src, []), cfg, HashSet(), PlanCounts()))
    assert [(p.id, p.variation, p.source_id) for p in planned] == [("a", None, None),
                                                                   ("b", None, None)]
    assert planned[1].outcome.seed == 7


def test_preflight_looks_past_a_text_stage_to_what_the_next_stage_would_refuse(tmp_path):
    cfg = copy.deepcopy(config(tmp_path))
    cfg["stages"].insert(1, {"name": "keyframe", "model": {"path": "tiny:flux"}})
    cfg["stages"][2]["model"]["path"] = "tiny:ltx-i2v"
    checks = preflight(validate(cfg))
    write_prompts(tmp_path / "in.parquet", [{"id": "a", "prompt": "x", "width": 40},
                                            {"id": "b", "prompt": "y", "width": None}])
    rows = list(plan_rows(open_dataset(str(tmp_path / "in.parquet"), []), validate(cfg),
                          HashSet(), PlanCounts(), checks=checks))
    assert (rows[0].outcome.error_code, rows[0].outcome.stage) == ("invalid_shape", "keyframe")
    assert rows[1].outcome.prompt == "y"
