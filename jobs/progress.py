"""Progress of a long job: a bar with rate and ETA on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("reelfarm.progress")

LOG_EVERY_S = 10.0  # log lines for files and schedulers: often enough to see it move


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.ok = 0
        self.failed = 0
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="video", dynamic_ncols=True, file=sys.stderr)
        self._enabled = enabled

    def advance(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed
        if self._bar is not None:
            self._bar.update(ok + failed)
            self._bar.set_postfix(failed=self.failed, refresh=False)
        elif self._enabled and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info(self.line())

    def line(self) -> str:
        done = self.ok + self.failed
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 and self.total > done else 0.0
        pct = 100.0 * done / self.total if self.total else 100.0
        return (f"{done}/{self.total} rows ({pct:.0f}%), {self.failed} failed, "
                f"{rate:.2f} rows/s, ETA {_duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
