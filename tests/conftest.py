"""Shared fixtures: one real local Ray cluster per session, a real S3 endpoint (moto on
127.0.0.1) per test; GPU tests skip without CUDA.

Helpers that tests import live in ``helpers.py``, not here.
"""

from __future__ import annotations

import urllib.request

import pytest
from helpers import free_port

@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the in-process tests of this session."""
    import ray

    from cluster.connect import connect

    resources = connect(None)
    yield resources
    ray.shutdown()


@pytest.fixture
def moto_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets per process, not per server: start every test from empty.
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10).close()
    yield port
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Point every S3 client of this process (and its children) at the endpoint in use."""
    import s3fs

    def use(port: int) -> dict:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        return env

    yield use
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(moto_server, s3_env):
    """An empty bucket on the endpoint, this process pointed at it: (bucket name, boto3 client)."""
    from helpers import s3_client

    s3_env(moto_server)
    client = s3_client()
    client.create_bucket(Bucket="reelfarm-test")
    return "reelfarm-test", client


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
