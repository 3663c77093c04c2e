"""Shared fixtures: one real local Ray cluster per session; GPU tests skip without CUDA.

Helpers that tests import live in ``helpers.py``, not here.
"""

from __future__ import annotations

import pytest

@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the in-process tests of this session."""
    import ray

    from cluster.connect import connect

    resources = connect(None)
    yield resources
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly on machines without CUDA."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
