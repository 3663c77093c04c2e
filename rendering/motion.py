"""Motion scores of rendered videos: how much their pixels move, with no model.

A static clip (a still picture repeated, a render that collapsed) makes poor training video;
curation pipelines drop it by optical flow (video2dataset and Open-Sora use OpenCV's Farneback).
The score is computed on the uint8 frames handed to the encoder, on the worker, before encoding:

- every frame is made grey and resized (area interpolation) to ``SIDE`` pixels on its longer
  side, so a score reads the same at any resolution;
- Farneback dense flow is computed between each pair of consecutive frames;
- ``motion_score``: the mean flow magnitude over every pixel of every pair, in pixels per frame
  at that ``SIDE``-pixel scale;
- ``motion_static_share``: the share of pairs whose mean magnitude is under ``static_threshold``;
- ``motion_static``: ``motion_score`` is under ``static_threshold`` (the clip barely moves).

A single frame (an image model's output) has no motion: every column is None.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("motion_score", "motion_static_share", "motion_static")
SIDE = 128  # pixels on the longer side: Farneback's cost grows with area, motion does not need more
# Farneback's parameters as video2dataset's optical-flow subsampler uses them: a 3-level pyramid,
# 15-pixel windows, 3 iterations, 5-pixel polynomial neighbourhoods.
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                  flags=0)


def motion_columns(video: np.ndarray, static_threshold: float) -> dict:
    """The motion columns of one uint8 (F, H, W, 3) video (see the module docstring)."""
    import cv2

    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not len(video):
        raise ValueError(f"a video must be uint8 (F, H, W, 3) with F >= 1, got {video.dtype} "
                         f"{video.shape}")
    if len(video) < 2:
        return dict.fromkeys(COLUMNS)
    height, width = video.shape[1:3]
    scale = SIDE / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    grey = [cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), size,
                       interpolation=cv2.INTER_AREA) for frame in video]
    magnitudes = np.array([
        float(np.linalg.norm(cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK),
                             axis=-1).mean())
        for a, b in zip(grey[:-1], grey[1:])])
    score = float(magnitudes.mean())
    return {"motion_score": score,
            "motion_static_share": float((magnitudes < static_threshold).mean()),
            "motion_static": score < static_threshold}
