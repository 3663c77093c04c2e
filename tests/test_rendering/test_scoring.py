"""CLIP scoring of rendered frames, with the real tiny CLIP (random weights, built offline)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from rendering import model_cache
from rendering.contract import ScoringSpec
from rendering.model_cache import ModelCacheError
from rendering.scoring import (COLUMNS, IMAGE_COLUMNS, TINY_CLIP, ClipScorer, build_tiny_clip,
                               save_tiny_clip)

# With the tiny model's weights these three score well above 0 on noise frames (a prompt such
# as "a red fox running through snow" scores below 0, so 0 after the clamp, on every one).
PROMPTS = ["a cat", "m", "x"]
NEGATIVE = "a red fox running through snow"


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer(ScoringSpec(TINY_CLIP), "cpu")


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bucket") / "models" / "tiny-clip"
    save_tiny_clip(str(folder))
    return folder


def _videos(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
            for frames, height, width in ((5, 48, 64), (1, 32, 32), (9, 40, 24))]


def _direct(model, image_processor, tokenizer, frame: np.ndarray, prompt: str) -> float:
    """cos(I(x), T(p)) computed by hand from the model's projected embeddings."""
    with torch.inference_mode():
        pixels = image_processor(images=[frame], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output[0]
        tokens = tokenizer([prompt], return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output[0]
    return float(image @ text / (image.norm() * text.norm()))


def test_each_row_gets_every_column_and_the_summaries_agree_with_the_frame_scores(scorer):
    videos = _videos()
    rows = scorer.score(PROMPTS, videos)
    assert len(rows) == len(videos)
    for row, video in zip(rows, videos):
        assert tuple(row) == COLUMNS
        scores = row["clip_scores"]
        assert len(scores) == len(video)
        assert all(math.isfinite(s) and 0.0 <= s <= 100.0 for s in scores)
        assert row["clip_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
        assert row["clip_score_min"] == min(scores)
        assert row["clip_worst_frame"] == scores.index(min(scores))
        assert row["clip_drift_frames"] == sum(s < 20.0 for s in scores)
    assert rows[1]["clip_temporal_consistency"] is None  # one frame: nothing to compare
    assert all(-1.0 <= r["clip_temporal_consistency"] <= 1.0 for r in (rows[0], rows[2]))


def test_identical_frames_are_perfectly_consistent_and_random_frames_less_so(scorer):
    frame = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    still, noise = scorer.score(PROMPTS[:2], [np.repeat(frame, 6, axis=0), _videos(2)[2]])
    assert still["clip_temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    # Equal up to float error: a frame's position in the batch may change the last bits.
    assert max(still["clip_scores"]) - min(still["clip_scores"]) < 1e-4
    assert noise["clip_temporal_consistency"] < 1.0 - 1e-4


def test_drift_counts_the_frames_below_the_threshold():
    video = _videos(3)[0]
    first = ClipScorer(ScoringSpec(TINY_CLIP), "cpu").score([PROMPTS[0]], [video])[0]
    scores = first["clip_scores"]
    ranked = sorted(set(scores))
    for threshold, expected in [(0.0, 0), (ranked[2], 2), (ranked[-1] + 1e-3, len(scores)),
                                (100.0, len(scores))]:
        row = ClipScorer(ScoringSpec(TINY_CLIP, drift_threshold=threshold), "cpu").score(
            [PROMPTS[0]], [video])[0]
        assert row["clip_scores"] == scores and row["clip_drift_frames"] == expected


def test_scores_are_deterministic_and_do_not_depend_on_batching(scorer):
    videos = _videos(4)
    together = scorer.score(PROMPTS, videos)
    assert ClipScorer(ScoringSpec(TINY_CLIP), "cpu").score(PROMPTS, videos) == together
    small_batches = ClipScorer(ScoringSpec(TINY_CLIP, batch_frames=3), "cpu")
    alone = [scorer.score([p], [v])[0] for p, v in zip(PROMPTS, videos)]
    for other in alone, small_batches.score(PROMPTS, videos):
        for a, b in zip(together, other):
            assert b["clip_scores"] == pytest.approx(a["clip_scores"], abs=1e-5)
            for key in ("clip_score", "clip_score_min", "clip_temporal_consistency"):
                assert b[key] == pytest.approx(a[key], abs=1e-5)
            assert (b["clip_worst_frame"], b["clip_drift_frames"]) == \
                (a["clip_worst_frame"], a["clip_drift_frames"])


def test_the_score_is_100_times_the_cosine_clamped_at_zero(scorer):
    model, image_processor, tokenizer = build_tiny_clip()
    frame = _videos(7)[0][:1]
    pairs = [(frame, PROMPTS[0]), (frame, NEGATIVE)]  # a positive cosine and a negative one
    cosines = [_direct(model, image_processor, tokenizer, v[0], p) for v, p in pairs]
    assert cosines[0] > 0 > cosines[1]
    rows = scorer.score([p for _, p in pairs], [v for v, _ in pairs])
    for row, cos in zip(rows, cosines):
        assert row["clip_scores"] == [pytest.approx(max(100.0 * cos, 0.0), abs=1e-4)]
    assert rows[1]["clip_scores"] == [0.0] and rows[1]["clip_drift_frames"] == 1

    two = _videos(7)[2][:2]
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=image_processor(
            images=list(two), return_tensors="pt")["pixel_values"]).pooler_output
    expected = float(torch.nn.functional.cosine_similarity(images[0], images[1], dim=0))
    row = scorer.score([PROMPTS[0]], [two])[0]
    assert row["clip_temporal_consistency"] == pytest.approx(expected, abs=1e-5)


def test_long_prompts_are_cut_to_clips_context_and_rows_without_a_prompt_get_consistency(scorer):
    video = _videos(5)[0]
    long_prompt = " ".join(["word"] * 200)
    cut, none = scorer.score([long_prompt, None], [video, video])
    assert len(cut["clip_scores"]) == len(video)
    assert none["clip_temporal_consistency"] == pytest.approx(cut["clip_temporal_consistency"],
                                                              abs=1e-6)
    assert none["clip_embedding"] == cut["clip_embedding"]
    assert all(none[key] is None for key in COLUMNS if key not in IMAGE_COLUMNS)


def test_a_saved_model_scores_the_same_from_a_folder_a_url_and_the_hub_cache(
        scorer, tiny_clip_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    expected = scorer.score(PROMPTS, _videos(6))
    # huggingface_hub's cache: refs/main names a snapshot folder.
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots").mkdir(parents=True)
    os.symlink(tiny_clip_folder, repo / "snapshots" / commit, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    url = f"file://{tiny_clip_folder}"
    for model in str(tiny_clip_folder), url, "acme/tiny-clip":
        loaded = ClipScorer(ScoringSpec(model), "cpu")
        got = loaded.score(PROMPTS, _videos(6))
        for a, b in zip(expected, got):
            assert b["clip_scores"] == pytest.approx(a["clip_scores"], abs=1e-5)
    assert sorted(os.listdir(model_cache.cached_path(url))) == sorted(os.listdir(tiny_clip_folder))

    with pytest.raises(ModelCacheError, match="not in this node's hub cache"):
        ClipScorer(ScoringSpec("acme/not-cached"), "cpu")


def test_only_safetensors_weights_load_and_bad_models_say_what_is_wrong(tiny_clip_folder, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in os.listdir(tiny_clip_folder):
        if name != "model.safetensors":
            (folder / name).write_bytes((tiny_clip_folder / name).read_bytes())
    torch.save(build_tiny_clip()[0].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelCacheError, match="safetensors"):
        ClipScorer(ScoringSpec(str(folder)), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCacheError, match="holds no config.json"):
        ClipScorer(ScoringSpec(f"file://{tmp_path / 'empty'}"), "cpu")
    with pytest.raises(ValueError, match="unknown tiny scoring model"):
        ClipScorer(ScoringSpec("tiny:modelscope"), "cpu")


def test_frames_must_be_the_encoded_uint8_pixels(scorer):
    video = _videos()[0]
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(["x"], [video.astype(np.float32) / 255.0])
    with pytest.raises(ValueError, match="2 prompts for 1 videos"):
        scorer.score(["x", "y"], [video])
    assert scorer.score([], []) == []
