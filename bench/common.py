"""What every benchmark shares: the machine it ran on, whole-process timing, medians.

Timings on a shared machine are noisy, so every benchmark runs its contenders side by side in
one process tree, repeats them in interleaved rounds, and reports medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "out")  # git-ignored: generated datasets, videos, raw results


@dataclass
class ProcessRun:
    argv: list[str]
    wall_s: float
    peak_rss_mb: float  # of the process itself (and the children it waited for)
    returncode: int
    output: str


def run_process(argv: list[str], timeout_s: float = 900.0) -> ProcessRun:
    """Run ``argv`` to completion; its wall time and peak RSS (from ``wait4``)."""
    started = time.monotonic()
    with open(os.devnull, "rb") as devnull, tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall_s = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
    return ProcessRun(argv, wall_s, usage.ru_maxrss / 1024.0, proc.returncode, output)




def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def machine() -> dict:
    """nproc, RAM, CPU model, OS, Python and library versions, date and commit."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "diffusers", "ray", "pyarrow", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not reported
            pass
    return {"nproc": os.cpu_count(), "ram_gb": ram_gb, "cpu": cpu,
            "os": platform.platform(), "python": platform.python_version(), **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "load_avg": os.getloadavg()}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True,
                               capture_output=True).stdout.strip()
        return head + (" (working tree modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def save(name: str, result: dict) -> str:
    """Write a benchmark's raw result as JSON under bench/out/ and return the path."""
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return path


def steady_rate(small: int, large: int, t_small: float, t_large: float) -> tuple[float, float] | None:
    """(videos/s, start-up s) from whole-process times at two sizes: the extra videos over the
    extra seconds, and what the smaller run spent beyond its videos. None when the larger run
    was not slower (too few videos to tell)."""
    if t_large <= t_small:
        return None
    rate = (large - small) / (t_large - t_small)
    return rate, t_small - small / rate


def python() -> str:
    return sys.executable


def has_pandas() -> bool:
    """Ray Data, the contender, needs pandas; reelfarm does not (``make bench`` installs it)."""
    import importlib.util

    return importlib.util.find_spec("pandas") is not None
