"""reelfarm's benchmarks: each module runs on its own (``python -m bench.<name> [--quick]``)."""
