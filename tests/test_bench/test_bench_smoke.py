"""The benchmarks still run: each one's --quick mode, end to end, as `make bench` would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # minutes: whole jobs and processes


@pytest.mark.parametrize("name", ["plan_scale", "driver_throughput", "cpu_side_by_side", "gpu",
                                  "products", "stages", "elastic", "metrics",
                                  "bookkeeping", "text_stage"])
def test_quick_mode_runs_and_saves_its_results(name):
    # The GPU run's options part is bench.options, whose quick mode has its own test below.
    parts = ["--parts", "plain", "reelfarm"] if name == "gpu" else []
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", *parts], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "saved " in result.stdout
    saved = result.stdout.rsplit("saved ", 1)[1].split()[0]
    with open(saved) as f:
        assert json.load(f)


def test_options_quick_mode_times_each_variant_against_its_baseline():
    result = subprocess.run([sys.executable, "-m", "bench.options", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = {}
    for line in result.stdout.splitlines():
        if line.startswith("saved "):
            with open(line.split(" ", 1)[1]) as f:
                saved = json.load(f)
            results[saved["model"]] = saved["variants"]
    assert set(results) == {"tiny:modelscope", "tiny:wan"}
    for variants in results.values():
        assert variants["baseline"]["x_baseline"] == 1.0
        measured = [v for v in variants.values() if v["status"] == "ok"]
        assert len(measured) >= 3
        assert all(v["s_per_video"] > 0 for v in measured)
        # Options that change only the speed leave the pixels as they were, up to rounding.
        assert all(v["drift_mean"] < 1e-3 for v in measured if v["exact"])
    cache = results["tiny:wan"]["fbc=0.1"]
    assert cache["status"] == "ok" and 0 < cache["blocks_run"] <= cache["block_calls"]
    assert results["tiny:modelscope"]["fbc=0.1"]["status"] == "skipped"
