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

    def stage_line(self) -> str:
        """Per stage: rows made, failed, and the rate since rendering began."""
        elapsed = self._clock() - self._rendering_since if self._rendering_since else 0.0
        parts = []
        for name, (ok, failed) in self.stages.items():
            rate = f", {ok / elapsed:.2f}/s" if elapsed > 0 else ""
            parts.append(f"{name} {ok} made{f', {failed} failed' if failed else ''}{rate}")
        return "; ".join(parts)

    def line(self) -> str:
        done = self.ok + self.failed
        pct = 100.0 * done / self.total if self.total else 100.0
        head = f"{done}/{self.total} rows ({pct:.0f}%), {self.failed} failed"
        if self._rendering_since is None:
            return f"{head}, workers starting"
        elapsed = self._clock() - self._rendering_since
        rendered = done - self._done_before
        if rendered <= 0 or elapsed <= 0:
            return f"{head}, rendering"
        rate = rendered / elapsed
        eta = (self.total - done) / rate if self.total > done else 0.0
        return f"{head}, {rate:.2f} rows/s, ETA {_duration(eta)}{self._workers_text()}"

    def _workers_text(self) -> str:
        if len(self.workers) == 1:
            return f", {next(iter(self.workers.values()))} worker(s)"
        return "".join(f", {name} {n} worker(s)" for name, n in self.workers.items())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
