"""The quality section: scores of every video and the gate of rules on them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.config.base import Section, switch
from rendering.quality import ON_FAIL, RULE_COLUMNS


class RuleConfig(Section):
    """One filter over a score column (see rendering.quality)."""

    column: Literal[RULE_COLUMNS] = Field(description="the score column it tests")
    min: float | None = Field(None, description="the column must be at least this")
    max: float | None = Field(None, description="the column must be at most this")
    on_fail: Literal[ON_FAIL] = Field(
        "keep", description="out of bounds: keep it (marked), fail the row, or render it again with new seeds")

    @model_validator(mode="after")
    def _bounded(self) -> "RuleConfig":
        if self.min is None and self.max is None:
            raise ValueError(f"quality rule on {self.column} needs min or max")
        return self


DEDUP_THRESHOLD = 0.95  # cosine: SemDeDup's eps = 0.05


class DedupConfig(Section):
    """Near-duplicates found after a run's last commit, as ``reelfarm dedup`` finds them."""

    threshold: float = Field(DEDUP_THRESHOLD, ge=-1, le=1, description="cosine similarity at or above which a row is a duplicate")
    search: Literal["exact", "buckets"] = Field(
        "exact", description="exact (quadratic), or within k-means buckets (for millions of rows; may miss a few)")


class QualityConfig(Section):
    """CLIP scores of every rendered frame against the prompt, embeddings, aesthetic and motion
    scores, and a gate of rules on them."""

    clip_model: str | None = Field(
        None, description="a CLIP model: hub id, local folder, URL, or tiny:clip (none: no scores)")
    revision: str | None = None
    drift_threshold: float = Field(20.0, ge=0, le=100, description="a frame scoring under this (0-100) has drifted")
    min_score: float | None = Field(None, ge=0, le=100, description="the gate: a video's clip_score must reach this")
    on_fail: Literal["keep", "fail", "retry"] = Field(
        "keep", description="below min_score: keep it (marked), fail the row, or render it again with new seeds")
    max_tries: int = Field(3, ge=1, le=20, description="retry: renders per row at most; the best is kept")
    aesthetic_model: str | None = Field(
        None, description="an aesthetic MLP head over CLIP image embeddings: hub id, local folder, "
                          "URL, or tiny:aesthetic (none: no aesthetic_score)")
    aesthetic_revision: str | None = None
    static_threshold: float = Field(
        0.2, ge=0, description="mean optical flow (pixels per frame at 128 px) under which a clip is static")
    rules: list[RuleConfig] = Field(
        default_factory=list, description="more filters: {column, min and/or max, on_fail}")
    on_unsafe: Literal["keep", "fail", "retry"] = Field(
        "keep", description="a picture the pipeline's safety checker flags (and blacks out): keep "
                            "it (flagged in safety_flagged), fail the row (unsafe_content), or "
                            "render it again with new seeds, up to max_tries")
    dedup: DedupConfig | None = Field(
        None, description="find near-duplicates after the last commit: true, or {threshold, search}")

    _dedup_switch = field_validator("dedup", mode="before")(switch)

    @model_validator(mode="after")
    def _gate_needs_scores(self) -> "QualityConfig":
        if self.min_score is not None and self.clip_model is None:
            raise ValueError("quality.min_score needs quality.clip_model to score the videos")
        if (self.rules or self.aesthetic_model or self.dedup) and self.clip_model is None:
            raise ValueError("quality.rules, quality.aesthetic_model and quality.dedup need "
                             "quality.clip_model to score the videos")
        if self.aesthetic_model is None and any(r.column == "aesthetic_score" for r in self.rules):
            raise ValueError("a quality rule on aesthetic_score needs quality.aesthetic_model")
        return self
