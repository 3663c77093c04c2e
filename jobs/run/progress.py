"""Progress of a long job: a bar with rate and ETA on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("reelfarm.progress")

LOG_EVERY_S = 10.0  # log lines for files and schedulers: often enough to see it move


class Progress:
    """Rows committed so far; rate and ETA count only the time since the workers were ready,
    so a minute of cluster start and model loading does not make the first ETA absurd."""

    def __init__(self, total: int, enabled: bool = True, clock=time.monotonic):
        self.total = total
        self.ok = 0
        self.failed = 0
        self._clock = clock
        self._rendering_since: float | None = None
        self._done_before = 0  # rows committed before rendering began (invalid, recovered)
        self._last_log = clock()
        self._bar = None
        self._enabled = enabled
        self.stages: dict[str, list[int]] = {}  # stage -> [rows it made, rows it failed]
        self.workers: dict[str, int] = {}  # stage -> workers taking shards (they follow the cluster)

    def rendering_started(self) -> None:
        """The workers are loaded: from now on the rate means rendering."""
        self._rendering_since = self._clock()
        self._done_before = self.ok + self.failed
        if self._enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # tqdm's rate leaves out ``initial``: the rows committed before rendering began.
            self._bar = tqdm(total=self.total, initial=self._done_before, unit="video",
                             dynamic_ncols=True, file=sys.stderr)

    def advance(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed
        if self._bar is not None:
            self._bar.update(ok + failed)
            self._bar.set_postfix_str(f"failed={self.failed}{self._workers_text()}" + (
                f" | {self.stage_line()}" if len(self.stages) > 1 else ""), refresh=False)
        elif self._enabled and self._clock() - self._last_log >= LOG_EVERY_S:
            self._last_log = self._clock()
            logger.info(self.line())
            if len(self.stages) > 1:
                logger.info("stages: %s", self.stage_line())

    def stage_advance(self, stage: str, ok: bool) -> None:
        """A stage finished a row (it made it, or failed it for good)."""
        self.stages.setdefault(stage, [0, 0])[0 if ok else 1] += 1

    def stage_rate(self, stage: str) -> float | None:
        """Rows ``stage`` made per second since rendering began."""
        elapsed = self._clock() - self._rendering_since if self._rendering_since else 0.0
        return self.stages.get(stage, [0, 0])[0] / elapsed if elapsed > 0 else None

    def stage_line(self) -> str:
        """Per stage: rows made, failed, and the rate since rendering began."""
        parts = []
        for name, (ok, failed) in self.stages.items():
            rate = self.stage_rate(name)
            rate = f", {rate:.2f}/s" if rate is not None else ""
            parts.append(f"{name} {ok} made{f', {failed} failed' if failed else ''}{rate}")
        return "; ".join(parts)

    def rate(self) -> float | None:
        """Rows committed per second since the workers were ready (None: none yet)."""
        if self._rendering_since is None:
            return None
        elapsed = self._clock() - self._rendering_since
        rendered = self.ok + self.failed - self._done_before
        return rendered / elapsed if rendered > 0 and elapsed > 0 else None

    def eta_s(self) -> float | None:
        """Seconds to the last commit at that rate."""
        rate, left = self.rate(), self.total - self.ok - self.failed
        return 0.0 if left <= 0 else left / rate if rate else None

    def line(self) -> str:
        done = self.ok + self.failed
        pct = 100.0 * done / self.total if self.total else 100.0
        head = f"{done}/{self.total} rows ({pct:.0f}%), {self.failed} failed"
        if self._rendering_since is None:
            return f"{head}, workers starting"
        rate = self.rate()
        if rate is None:
            return f"{head}, rendering"
        return f"{head}, {rate:.2f} rows/s, ETA {duration(self.eta_s())}{self._workers_text()}"

    def _workers_text(self) -> str:
        if len(self.workers) == 1:
            return f", {next(iter(self.workers.values()))} worker(s)"
        return "".join(f", {name} {n} worker(s)" for name, n in self.workers.items())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def duration(seconds: float) -> str:
    """A person's reading of a duration: 1h05m, 3m07s."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
