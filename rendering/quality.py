"""The quality gate: which rules a rendered row's scores miss (CLIP, aesthetic, motion), the
seeds of its retries, which try is kept, and how summaries name the rows kept below it.

``quality.min_score`` is the rule ``clip_score >= min_score`` with ``quality.on_fail``; every
entry of ``quality.rules`` is one more. A row is rendered again while it misses a ``retry``
rule (up to ``max_tries`` renders); the kept try is the one that misses fewest rules (then the
best by the first rule); a ``fail`` rule it still misses fails the row; ``keep`` rules only mark
it (``quality_passed`` false, ``quality_failed_rules`` naming them).

A retry renders the row again with a seed derived from the row's seed and the try number, so
the same config and input keep the same videos. The tries happen inside one attempt at the row:
it is committed (and its receipt written) only once its kept try is stored, so a crash between
tries loses no committed work, only that row's tries in flight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SEED_LIMIT = 2**63  # as the driver's row seeds: torch.Generator takes signed 64-bit values


# The columns a rule may test: one number (or flag, as 0 / 1) per row, from rendering.scoring
# and rendering.motion.
RULE_COLUMNS = ("clip_score", "clip_score_min", "clip_temporal_consistency", "clip_drift_frames",
                "aesthetic_score", "motion_score", "motion_static_share", "motion_static")
ON_FAIL = ("keep", "fail", "retry")


@dataclass(frozen=True)
class Rule:
    """One filter: ``column`` must be at least ``min`` and at most ``max``; a row that misses is
    kept (marked), failed, or rendered again with derived seeds (``on_fail``)."""

    column: str
    min: float | None = None
    max: float | None = None
    on_fail: str = "keep"  # keep | fail | retry
    source: str = "quality.rules"  # the setting it came from, named in errors

    def passes(self, metrics: dict) -> bool | None:
        """Whether the row's value is within bounds; None when it has none (no prompt, one
        frame, no aesthetic model)."""
        value = metrics.get(self.column)
        if value is None:
            return None
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def quality(self, metrics: dict) -> float:
        """The row's value oriented so that higher is better (for choosing a try)."""
        value = metrics.get(self.column)
        if value is None:
            return float("-inf")
        return float(value) if self.min is not None else -float(value)

    @property
    def text(self) -> str:
        bounds = [f">= {self.min:g}"] if self.min is not None else []
        bounds += [f"<= {self.max:g}"] if self.max is not None else []
        return f"{self.column} {' and '.join(bounds)}"

    def failure(self, metrics: dict) -> tuple[str, str]:
        """(error code, message) of a row this rule fails."""
        value = float(metrics[self.column])
        if self.min is not None and value < self.min:
            return "below_min_score", f"{self.column} {value:.2f} is under {self.source} = {self.min:g}"
        return "above_max_score", f"{self.column} {value:.2f} is over {self.source} = {self.max:g}"


@dataclass(frozen=True)
class GateSpec:
    """The rules every scored video is held to, and the renders a retry may take."""

    rules: tuple[Rule, ...]
    max_tries: int  # renders per row at most, the first included


def retry_seed(seed: int, try_number: int, reason: str = "try") -> int:
    """The seed of a row's try ``try_number`` (1 is the row's own render). Another ``reason``
    ("unsafe": a picture the safety checker flagged) draws other seeds, so a gate's try never
    repeats a picture that a safety retry already made."""
    if try_number == 1:
        return seed
    digest = hashlib.sha256(f"{seed}\x00{reason}\x00{try_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def failing(metrics: dict, gate: GateSpec) -> list[Rule]:
    """The rules a scored video misses (a rule with no value to test is not missed)."""
    return [rule for rule in gate.rules if rule.passes(metrics) is False]


def judged(metrics: dict, gate: GateSpec) -> bool:
    """Whether any rule has a value to test: a video with none (no prompt) is not gated."""
    return any(rule.passes(metrics) is not None for rule in gate.rules)


def wants_retry(metrics: dict, gate: GateSpec) -> bool:
    return any(rule.on_fail == "retry" for rule in failing(metrics, gate))


def kept_try(tries: list[dict | None], gate: GateSpec) -> int:
    """The index of the try to keep (None: a try that failed): the one missing fewest rules,
    then the best value of the first rule, the earliest of equals."""
    def rank(i: int) -> tuple:
        if tries[i] is None:
            return (1, -1, 0.0, -i)
        return (0, -len(failing(tries[i], gate)), gate.rules[0].quality(tries[i]), -i)

    return max(range(len(tries)), key=rank)


def verdict(metrics: dict, gate: GateSpec) -> tuple[bool | None, list[str], tuple[str, str] | None]:
    """What the gate says of the kept try: passed (None: nothing to test), the rules it misses
    (as text), and the (error code, message) that fails the row, if a ``fail`` rule is missed."""
    missed = failing(metrics, gate)
    passed = None if not judged(metrics, gate) else not missed
    fatal = next((rule for rule in missed if rule.on_fail == "fail"), None)
    return passed, [rule.text for rule in missed], fatal and fatal.failure(metrics)


def gate_words(quality: dict) -> str:
    """The gate a quality section (as job.json stores it) sets, in a few words: "quality.min_score
    30", "quality.min_score 30 and 2 rules", "2 quality rules"."""
    min_score, rules = quality.get("min_score"), len(quality.get("rules") or ())
    plural = "rule" if rules == 1 else "rules"
    if min_score is None:
        return f"{rules} quality {plural}" if rules else "the quality gate"
    return f"quality.min_score {min_score:g}" + (f" and {rules} {plural}" if rules else "")


def kept_below_text(kept_below: dict[int, int], quality: dict) -> str:
    """What the summaries say of the ok rows kept short of the gate (tries -> rows), such as "8
    kept below quality.min_score 30 after 3 tries"; empty when there are none."""
    rows = sum(kept_below.values())
    if not rows:
        return ""
    fewest, most = min(kept_below), max(kept_below)
    tries = f"{most}" if fewest == most else f"{fewest} to {most}"
    return (f"{rows} kept below {gate_words(quality)} after {tries} "
            f"{'try' if most == 1 else 'tries'}")
