"""Per-sample scores beside CLIP's: motion on synthetic clips, the aesthetic head against a
hand-computed MLP, and the video embedding (real tiny CLIP, real OpenCV, no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rendering.aesthetic import (TINY_AESTHETIC, AestheticHead, load_head, read_head,
                                 save_tiny_head, score_frames)
from rendering.contract import ScoringSpec
from rendering.model_cache import ModelCacheError
from rendering.motion import SIDE, motion_columns
from rendering.scoring import TINY_CLIP, ClipScorer

FRAMES, HEIGHT, WIDTH = 8, 64, 96


def _texture(seed: int = 0, width: int = WIDTH) -> np.ndarray:
    """A smooth random picture (flow needs texture, and noise is all texture)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (HEIGHT // 8, width // 8, 3)).astype(np.uint8)
    return np.kron(coarse, np.ones((8, 8, 1), np.uint8))


def _pan(pixels_per_frame: int) -> np.ndarray:
    wide = _texture(width=WIDTH * 3)
    return np.stack([wide[:, i * pixels_per_frame:i * pixels_per_frame + WIDTH]
                     for i in range(FRAMES)])


def test_motion_orders_a_static_clip_a_slow_pan_a_fast_pan_and_flags_only_the_static_one():
    static = np.repeat(_texture()[None], FRAMES, axis=0)
    noise = np.random.default_rng(1).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    scores = {name: motion_columns(video, static_threshold=0.2) for name, video in
              (("static", static), ("slow", _pan(2)), ("fast", _pan(6)), ("noise", noise))}
    order = sorted(scores, key=lambda name: scores[name]["motion_score"])
    assert order[0] == "static" and order.index("slow") < order.index("fast")
    assert scores["noise"]["motion_score"] > 10 * scores["static"]["motion_score"]
    # The fast pan moves 6 px a frame at 96 px wide: 8 px a frame at the 128-px scale.
    assert scores["fast"]["motion_score"] == pytest.approx(6 * SIDE / WIDTH, rel=0.2)
    assert [scores[n]["motion_static"] for n in ("static", "slow", "fast", "noise")] == \
        [True, False, False, False]
    assert scores["static"]["motion_static_share"] == 1.0
    assert scores["fast"]["motion_static_share"] == 0.0


def test_a_pan_that_stops_halfway_is_half_static_and_a_single_frame_has_no_motion():
    pan = _pan(4)
    half = np.concatenate([pan[:4], np.repeat(pan[3:4], 5, axis=0)])  # 8 frame pairs, 3 moving
    row = motion_columns(half, static_threshold=0.2)
    assert row["motion_static_share"] == pytest.approx(5 / 8)
    assert motion_columns(pan[:1], 0.2) == dict.fromkeys(row)
    with pytest.raises(ValueError, match="uint8"):
        motion_columns(pan.astype(np.float32), 0.2)


def test_the_aesthetic_head_equals_a_hand_computed_mlp(tmp_path):
    rng = np.random.default_rng(2)
    sizes = (6, 4, 3, 1)
    layers = [(rng.standard_normal((o, i)), rng.standard_normal(o)) for i, o in zip(sizes, sizes[1:])]
    tensors = {}
    for n, (w, b) in enumerate(layers):  # LAION's numbering: dropouts sit between the linears
        tensors[f"layers.{2 * n}.weight"] = torch.tensor(w, dtype=torch.float32)
        tensors[f"layers.{2 * n}.bias"] = torch.tensor(b, dtype=torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"activation": "relu"}))
    embedding = rng.standard_normal(6)
    embedding /= np.linalg.norm(embedding)
    by_hand = embedding
    for n, (w, b) in enumerate(layers):
        by_hand = w.astype(np.float32) @ by_hand + b.astype(np.float32)
        if n < len(layers) - 1:
            by_hand = np.maximum(by_hand, 0)
    head = read_head(str(tmp_path))
    out = head(torch.tensor(embedding[None], dtype=torch.float32))
    assert out.shape == (1,) and float(out[0]) == pytest.approx(float(by_hand[0]), rel=1e-5)
    assert load_head(str(tmp_path), None, 6).activation == "relu"
    with pytest.raises(ValueError, match="takes embeddings of size 6, but the CLIP model gives 32"):
        load_head(str(tmp_path), None, 32)


def test_a_saved_tiny_head_loads_as_the_built_one_and_bad_heads_are_refused(tmp_path):
    save_tiny_head(str(tmp_path / "tiny"), 32)
    x = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    assert torch.equal(load_head(str(tmp_path / "tiny"), None, 32)(x),
                       load_head(TINY_AESTHETIC, None, 32)(x))
    with pytest.raises(ValueError, match="do not chain"):
        AestheticHead([(torch.ones(4, 3), torch.ones(4)), (torch.ones(1, 5), torch.ones(1))])
    with pytest.raises(ValueError, match="one output"):
        AestheticHead([(torch.ones(2, 3), torch.ones(2))])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelCacheError, match="one .safetensors file"):
        read_head(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown tiny aesthetic model"):
        load_head("tiny:laion", None, 32)
    assert score_frames(1) == [0] and score_frames(2) == [0, 1] and score_frames(9) == [0, 4, 8]


def test_the_video_embedding_is_the_normalized_mean_of_its_frames_and_aesthetic_uses_three():
    scorer = ClipScorer(ScoringSpec(TINY_CLIP, aesthetic_model=TINY_AESTHETIC), "cpu")
    video = np.random.default_rng(3).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    row = scorer.score(["a cat"], [video])[0]
    with torch.inference_mode():
        frames = scorer._image_embeddings(list(video))
        mean = frames.mean(0)
        expected = (mean / mean.norm()).half().float()
        aesthetic = float(scorer.aesthetic(frames[[0, 3, 6]]).mean())
    assert np.array_equal(np.array(row["clip_embedding"], np.float32), expected.numpy())
    assert np.linalg.norm(row["clip_embedding"]) == pytest.approx(1.0, abs=1e-3)
    assert row["aesthetic_score"] == pytest.approx(aesthetic, rel=1e-5)
