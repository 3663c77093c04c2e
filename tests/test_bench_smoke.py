"""The benchmarks still run: each one's --quick mode, end to end, as `make bench` would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("name", ["plan_scale", "driver_throughput", "cpu_side_by_side", "gpu"])
def test_quick_mode_runs_and_saves_its_results(name):
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "saved " in result.stdout
    saved = result.stdout.rsplit("saved ", 1)[1].split()[0]
    with open(saved) as f:
        assert json.load(f)
