"""The text stage's worker side without Ray: the tiny LM and its chat template, batched and
per-row seeded generation, the judge of a rewrite, the cache, the video model's prompt limit,
and the shipped system prompts."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from rendering.contract import ModelSpec
from rendering.text import judge
from rendering.text.cache import RewriteCache, rewrite_key
from rendering.text.prompts import SHIPPED, sha256, system_prompt


def text_worker(out, **text):
    """A text stage's worker spec on the tiny LM, storing under ``out``."""
    from rendering.contract import TextSpec, WorkerSpec

    return WorkerSpec(ModelSpec("tiny:lm"), None, str(out), "stages/rewrite", "receipts/rewrite",
                      "previews", batch_size=4, artifact_name="rewrite", final=False,
                      text=TextSpec("Rewrite it.", sha256("Rewrite it."), 8, **text))


@pytest.fixture(scope="module")
def lm():
    from rendering.text.generate import CausalLM

    return CausalLM(ModelSpec("tiny:lm"), "cpu")


PROMPTS = ["a fox in the snow", "a cat on a table", "neon city street at night", "an owl",
           "waves on a beach at sunset"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_batch_writes_what_each_row_would_alone_whatever_its_batch_mates(lm, temperature):
    from rendering.text.generate import Sampling

    sampling = Sampling(24, temperature, top_p=0.9, top_k=40)
    seeds = [11, 12, 13, 14, 15]
    batched = lm.generate("Rewrite the prompt.", PROMPTS, seeds, sampling)
    alone = [lm.generate("Rewrite the prompt.", [p], [s], sampling)[0]
             for p, s in zip(PROMPTS, seeds)]
    reordered = lm.generate("Rewrite the prompt.", PROMPTS[::-1], seeds[::-1], sampling)[::-1]
    assert batched == alone == reordered
    assert all(g.text and g.tokens <= 24 for g in batched)
    again = lm.generate("Rewrite the prompt.", PROMPTS[:1], [99], sampling)[0]
    assert (again == batched[0]) == (temperature == 0)  # the seed decides a sampled text only


def test_the_chat_template_puts_the_system_prompt_and_the_row_in_their_turns(lm):
    chat = lm.chats.chat("Rewrite it.", "a fox")
    assert chat == ("<|im_start|>system\nRewrite it.<|im_end|>\n<|im_start|>user\na fox"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_make_tiny_model_writes_a_language_model_that_loads_as_a_published_one(tmp_path, lm):
    from rendering.text.generate import CausalLM, Sampling

    result = run_cli("make-tiny-model", str(tmp_path / "lm"), "--kind", "lm")
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= \
        {p.name for p in (tmp_path / "lm").iterdir()}
    loaded = CausalLM(ModelSpec(str(tmp_path / "lm")), "cpu")
    sampling = Sampling(12)
    assert loaded.generate("x", PROMPTS, [0] * 5, sampling) == \
        lm.generate("x", PROMPTS, [0] * 5, sampling)


def test_a_folder_with_weights_only_in_pickles_is_refused(tmp_path):
    from rendering.model_cache import ModelCacheError
    from rendering.text.generate import CausalLM

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelCacheError, match="safetensors only"):
        CausalLM(ModelSpec(str(tmp_path)), "cpu")


@pytest.mark.parametrize("generated, ended, expected", [
    ("  A fox runs.\n\nSnow falls.  ", True, ("A fox runs. Snow falls.", None)),
    ('<think>plan it</think>Rewritten prompt: "A fox runs."', True, ("A fox runs.", None)),
    ("**Prompt:** A fox runs. Snow falls and the", False, ("A fox runs.", None)),
    ("an unfinished thought with no end", False, ("an unfinished thought with no end", None)),
    ("", True, ("", "empty")),
    ("<think>only thinking", False, ("", "empty")),
    (", , . ,", True, (", , . ,", "not_text")),
    ("bytes \ufffd that were not UTF-8", True, ("bytes \ufffd that were not UTF-8", "not_text")),
    ("a bell \x07 rings", True, ("a bell \x07 rings", "not_text")),
])
def test_a_rewrite_is_cleaned_finished_and_judged(generated, ended, expected):
    assert judge.rewrite(generated, ended) == expected


def test_a_rewrite_over_the_limit_loses_whole_sentences_or_falls_back():
    words = lambda text: len(text.split())  # noqa: E731 - a tokenizer of one token a word
    text = "One two three. Four five six! Seven eight nine?"
    assert judge.rewrite(text, True, words, 9) == (text, None)
    assert judge.rewrite(text, True, words, 7) == ("One two three. Four five six!", None)
    assert judge.rewrite(text, True, words, 3) == ("One two three.", None)
    assert judge.rewrite(text, True, words, 2) == (text, "too_long")
    assert judge.rewrite("no sentence ends here at all", True, words, 3)[1] == "too_long"


def test_a_cache_entry_answers_only_its_key_and_its_own_bytes(tmp_path):
    cache = RewriteCache(str(tmp_path / "cache"))
    greedy = rewrite_key("a fox", "tiny:lm", None, "system", {"temperature": 0.0}, None)
    assert rewrite_key("a fox", "tiny:lm", None, "system", {"temperature": 0.0}, None) == greedy
    others = {rewrite_key("a cat", "tiny:lm", None, "system", {"temperature": 0.0}, None),
              rewrite_key("a fox", "tiny:lm", "v2", "system", {"temperature": 0.0}, None),
              rewrite_key("a fox", "tiny:lm", None, "other", {"temperature": 0.0}, None),
              rewrite_key("a fox", "tiny:lm", None, "system", {"temperature": 0.5}, 7)}
    assert greedy not in others and len(others) == 4
    assert cache.get(greedy) is None
    cache.put(greedy, "A fox runs.", True)
    assert cache.get(greedy) == ("A fox runs.", True)
    path = tmp_path / "cache" / f"{greedy}.json"
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "text": "A fox walks."}))  # not its sha256
    assert cache.get(greedy) is None
    path.write_text(json.dumps(entry))
    other = next(iter(others))
    (tmp_path / "cache" / f"{other}.json").write_text(json.dumps(entry))  # another key's entry
    assert cache.get(other) is None
    (tmp_path / "cache" / f"{other}.json").write_text("{not json")
    assert cache.get(other) is None


@pytest.mark.parametrize("kind, tokens", [("ltx-i2v", 128), ("wan", 512), ("cogvideox", 226),
                                          ("modelscope", 77), ("svd", None)])
def test_the_video_models_prompt_limit_is_read_without_its_weights(kind, tokens):
    from rendering.text.limit import prompt_limit

    limit = prompt_limit(ModelSpec(f"tiny:{kind}"))
    assert (limit.tokens if limit else None) == tokens
    if limit:
        assert limit.count("a fox") > 1
        assert prompt_limit(ModelSpec(f"tiny:{kind}"), tokens=9).tokens == 9


def test_the_prompt_limit_of_a_model_folder_comes_from_its_index_and_tokenizer(tmp_path):
    from rendering.pipelines.tiny import save_tiny_pipeline
    from rendering.text.limit import prompt_limit

    save_tiny_pipeline("ltx", str(tmp_path))
    limit = prompt_limit(ModelSpec(str(tmp_path)))
    assert limit.tokens == 128
    assert limit.count("a fox runs") == prompt_limit(ModelSpec("tiny:ltx")).count("a fox runs")


def test_system_prompts_are_shipped_or_read_from_a_file_with_the_target_length(tmp_path):
    for name, text in SHIPPED.items():
        written = system_prompt(name, 90)
        assert "{words}" in text and "about 90 words" in written and "{words}" not in written
    assert "image-to-video" in system_prompt("i2v", 90)
    own = tmp_path / "mine.txt"
    own.write_text("Write {words} words.\n")
    assert system_prompt(str(own), 12) == "Write 12 words."
    assert sha256("Write 12 words.") == sha256(system_prompt(str(own), 12))
    with pytest.raises(ValueError, match="cannot read the system prompt file"):
        system_prompt(str(tmp_path / "missing.txt"), 12)
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        system_prompt(str(tmp_path / "blank.txt"), 12)


def test_a_failing_batch_is_generated_again_a_chat_at_a_time_and_a_poison_row_fails_alone(
        tmp_path, monkeypatch):
    from rendering.contract import Task
    from rendering.text.generate import CausalLM
    from rendering.text.worker import TextRewriter

    real = CausalLM.generate

    def refusing(self, system, prompts, seeds, sampling):
        if "poison" in " ".join(prompts):
            raise RuntimeError("out of memory")
        return real(self, system, prompts, seeds, sampling)

    monkeypatch.setattr(CausalLM, "generate", refusing)
    worker = TextRewriter(text_worker(tmp_path), "cpu")
    tasks = [Task(f"r{i}", f"r{i}", i, p, {}) for i, p in enumerate(["a fox", "poison", "an owl"])]
    results = worker.render_shard(tasks)
    assert [r.ok for r in results] == [True, False, True]
    assert (results[1].error_code, results[1].retryable) == ("render_error", True)
    assert worker.generated == 2
    stored = json.loads((tmp_path / results[0].artifacts[0].path).read_text())
    assert stored["prompt"] == "a fox" and results[0].artifacts[0].kind == "text"
    assert "engine" not in stored  # transformers, as every rewrite before there was a choice
    assert (tmp_path / "receipts" / "rewrite" / "r0.json").exists()


# As the code before text.engine computed them for the row below: caches made then keep hitting.
KEYS_BEFORE_ENGINES = {0.0: "e67f222065a92b93b0ac35f1579b1f0c781f2e0dabf76909504d8298435ff5bd",
                       0.8: "206ec12063eca33eb8275e311bda9065ff73692aaf09c6a4ad7a9b4f05fee72f"}


@pytest.mark.parametrize("temperature", sorted(KEYS_BEFORE_ENGINES))
def test_a_rewrite_keeps_its_cache_key_on_transformers_and_gets_another_on_vllm(tmp_path,
                                                                               temperature):
    from rendering.contract import Task
    from rendering.text.worker import task_key

    task = Task("a", "a", 7, "a fox", {})
    before = KEYS_BEFORE_ENGINES[temperature]
    assert task_key(text_worker(tmp_path, temperature=temperature, top_p=0.9), task) == before
    assert task_key(text_worker(tmp_path, temperature=temperature, top_p=0.9,
                                engine="transformers"), task) == before
    assert task_key(text_worker(tmp_path, temperature=temperature, top_p=0.9, engine="vllm"),
                    task) != before


def test_a_vllm_worker_without_vllm_fails_at_start_saying_how_to_install_it(tmp_path):
    import importlib.util

    from rendering.text.worker import TextRewriter

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"^text.engine: vllm needs the vllm package, which "
                                          r"this worker cannot import \(No module named 'vllm'\): "
                                          r"install reelfarm's vllm extra on the GPU "
                                          r"machines \(pip install -e '\.\[vllm\]'"):
        TextRewriter(text_worker(tmp_path, engine="vllm"), "cpu")
    with pytest.raises(ValueError, match="text.engine 'tgi': choose transformers or vllm"):
        TextRewriter(text_worker(tmp_path, engine="tgi"), "cpu")


def test_the_vllm_engine_gives_the_model_the_tokens_the_transformers_engine_does(tmp_path, lm):
    from rendering.text.tiny import END, save_tiny_lm
    from rendering.text.vllm_engine import load_chats

    save_tiny_lm(str(tmp_path / "lm"))
    chats, _ = load_chats("lm", str(tmp_path / "lm"))  # from the folder vLLM loads
    ids = chats.token_ids("Rewrite the prompt.", PROMPTS)
    assert ids == lm.chats.token_ids("Rewrite the prompt.", PROMPTS)
    assert ids[0] == lm.chats.tokenizer(lm.chats.chat("Rewrite the prompt.", PROMPTS[0]),
                                        add_special_tokens=False)["input_ids"]
    assert chats.end_ids == lm.chats.end_ids == [chats.tokenizer.convert_tokens_to_ids(END)]
    fox = chats.tokenizer.convert_tokens_to_ids(["a", "fox"])
    assert chats.decoded(fox, ended=True) == lm.chats.decoded(fox + chats.end_ids)  # end left out


@pytest.mark.gpu
def test_both_engines_write_the_same_greedy_rewrites_of_the_tiny_lm(tmp_path):
    pytest.importorskip("vllm")
    from rendering.text.generate import CausalLM, Sampling
    from rendering.text.tiny import save_tiny_lm
    from rendering.text.vllm_engine import VllmLM

    save_tiny_lm(str(tmp_path / "lm"))
    spec = ModelSpec(str(tmp_path / "lm"))  # float32: the engines' kernels round alike
    seeds = list(range(len(PROMPTS)))
    with pytest.raises(ValueError, match="text.engine: vllm needs a GPU, and this worker has none"):
        VllmLM(spec, "cpu")
    fast = VllmLM(spec, "cuda", gpu_fraction=0.3)
    greedy = Sampling(24)
    made = fast.generate("Rewrite the prompt.", PROMPTS, seeds, greedy)
    assert made == CausalLM(spec, "cuda").generate("Rewrite the prompt.", PROMPTS, seeds, greedy)
    assert all(g.text for g in made) and fast.model_class == "LlamaForCausalLM on vLLM"
    sampled = Sampling(24, 0.9, top_p=0.9, top_k=40)  # each row's draw seeded by its seed
    first = fast.generate("Rewrite the prompt.", PROMPTS, seeds, sampled)
    assert fast.generate("Rewrite the prompt.", PROMPTS[::-1], seeds[::-1], sampled)[::-1] == first
