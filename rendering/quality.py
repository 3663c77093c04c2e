"""The quality gate: whether a rendered row's CLIP score passes, the seeds of its retries,
which try is kept, and how summaries name the rows kept below it.

A retry renders the row again with a seed derived from the row's seed and the try number, so
the same config and input keep the same videos. The tries happen inside one attempt at the row:
it is committed (and its receipt written) only once its kept try is stored, so a crash between
tries loses no committed work, only that row's tries in flight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SEED_LIMIT = 2**63  # as the driver's row seeds: torch.Generator takes signed 64-bit values


@dataclass(frozen=True)
class GateSpec:
    min_score: float  # on the 0-100 clip_score scale
    on_fail: str  # keep (mark it) | fail (the row fails as below_min_score) | retry
    max_tries: int  # renders per row at most, the first included


def retry_seed(seed: int, try_number: int, reason: str = "try") -> int:
    """The seed of a row's try ``try_number`` (1 is the row's own render). Another ``reason``
    ("unsafe": a picture the safety checker flagged) draws other seeds, so a gate's try never
    repeats a picture that a safety retry already made."""
    if try_number == 1:
        return seed
    digest = hashlib.sha256(f"{seed}\x00{reason}\x00{try_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def passes(score: float | None, gate: GateSpec) -> bool | None:
    """Whether a video's clip_score reaches the gate; None when it has no score (no prompt)."""
    return None if score is None else score >= gate.min_score


def kept_try(scores: list[float | None]) -> int:
    """The index of the try to keep: the highest score, the earliest of equals."""
    best = 0
    for i, score in enumerate(scores):
        if score is not None and (scores[best] is None or score > scores[best]):
            best = i
    return best


def kept_below_text(kept_below: dict[int, int], min_score: float | None) -> str:
    """What the summaries say of the ok rows kept under the gate (tries -> rows), such as "8 kept
    below quality.min_score 30 after 3 tries"; empty when there are none."""
    rows = sum(kept_below.values())
    if not rows:
        return ""
    fewest, most = min(kept_below), max(kept_below)
    tries = f"{most}" if fewest == most else f"{fewest} to {most}"
    threshold = "" if min_score is None else f" {min_score:g}"
    return (f"{rows} kept below quality.min_score{threshold} after {tries} "
            f"{'try' if most == 1 else 'tries'}")
