"""The benchmarks still run (`make bench-smoke`): each one's --quick mode, end to end (half of
them; test_bench_smoke_jobs.py the other half, so that the two halves run side by side)."""

from __future__ import annotations

import pytest
from helpers import run_quick_bench

pytestmark = pytest.mark.slow  # minutes: whole jobs and processes


@pytest.mark.parametrize("name", ["plan_scale", "cpu_side_by_side", "elastic", "bookkeeping",
                                  "text_stage", "report_scores"])
def test_quick_mode_runs_and_saves_its_results(name):
    assert run_quick_bench(name)
