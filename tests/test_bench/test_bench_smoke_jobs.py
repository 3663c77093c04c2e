"""The benchmarks still run: the other half of test_bench_smoke.py's, and the option sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, run_quick_bench

pytestmark = pytest.mark.slow  # minutes: whole jobs and processes


@pytest.mark.parametrize("name", ["driver_throughput", "gpu", "products", "stages", "metrics"])
def test_quick_mode_runs_and_saves_its_results(name):
    # The GPU run's options part is bench.options, whose quick mode has its own test below.
    assert run_quick_bench(name, *(["--parts", "plain", "reelfarm"] if name == "gpu" else []))


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
