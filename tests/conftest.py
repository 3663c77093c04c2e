"""Shared fixtures: one real local Ray cluster per session, a real S3 endpoint (moto on
127.0.0.1) per test; GPU tests skip without CUDA.

The suite runs on several processes at once (pytest-xdist, ``make test``): each is a session of
its own, with its own local Ray cluster, ports chosen free, folders under its own temp dir; and
no test leaves its environment variables to the next one.

Helpers that tests import live in ``helpers.py``, not here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import urllib.request

import pytest
from helpers import free_port


def pytest_configure(config):
    worker = hasattr(config, "workerinput")
    if worker or getattr(config.option, "dist", "no") == "no":  # a process that runs tests
        _ray_temp_dir_of_its_own()
    if not worker:  # before any worker process starts
        _ray_token_made_once()


def _ray_temp_dir_of_its_own() -> None:
    """Ray keeps its sessions, sockets and the record ``ray start`` leaves for ``auto``
    (``ray_current_cluster``) under RAY_TMPDIR, /tmp/ray unless set: one folder for every Ray on
    the machine. Each session (each xdist worker) gets a folder of its own, which the CLIs and
    clusters it starts inherit; short, as Ray's socket paths must fit in 107 bytes."""
    if os.environ.get("RAY_TMPDIR"):
        return
    folder = tempfile.mkdtemp(prefix="rf-ray-")
    os.environ["RAY_TMPDIR"] = folder
    atexit.register(shutil.rmtree, folder, True)  # after Ray's own exit handler (registered later)


def _ray_token_made_once() -> None:
    """Ray's first local cluster on a machine writes a new token to ~/.ray/auth_token, which
    every later one reads. Two sessions starting their first clusters at once could each write
    one and start with the other's: the token is made here, once, before they start."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        return
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    generate_and_save_token()


# What ray.init and connect() set in os.environ for this process's Ray cluster, which outlives the
# test that started it: connect()'s RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER goes with a constant it sets
# in this process, and the subprocesses that join a cluster from here need the two to agree.
_RAY_SETTINGS = ("RAY_", "PYTHONBREAKPOINT")


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test sets in os.environ ends with it (Ray's settings for this process's cluster
    aside). Subprocesses get this process's environment (``run_cli``), so a variable left behind
    reaches whichever tests the session runs later: the CLI's ``main()`` run in-process sets
    DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY for the workers it starts, which silenced the
    library logs ``--debug`` must show in a later test, in whatever order xdist ran them."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        if not key.startswith(_RAY_SETTINGS):
            del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value and not key.startswith(_RAY_SETTINGS):
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the in-process tests of this session (each xdist
    worker process is a session: its cluster is its own, ``address="local"``)."""
    import ray

    from cluster.connect import connect

    resources = connect(None)
    yield resources
    ray.shutdown()


@pytest.fixture(scope="module")
def _cluster_head():
    """The head of ``cluster``, started once a test file (seconds each time): its tests share it."""
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, connect=False,
                   head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    yield head
    head.shutdown()


@pytest.fixture
def cluster(_cluster_head):
    """A multi-node Ray cluster simulated on this machine (``ray.cluster_utils``): tests add
    nodes with fake GPUs and remove them. The head holds no GPU, like a head pod that only
    runs drivers and Ray's own services; every node a test added is gone when it ends, so the
    next test starts from the head alone."""
    yield _cluster_head
    for node in list(_cluster_head.worker_nodes):
        _cluster_head.remove_node(node)


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


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """Where outputs go: a local folder or an S3 prefix (this process pointed at moto)."""
    if request.param == "local":
        return str(tmp_path / "outputs")
    bucket, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/outputs"


def pytest_collection_modifyitems(config, items):
    """Files of ``slow`` tests run first: the suite's processes take whole files (``--dist
    loadfile``), and a long file started last would leave the other process idle at the end.
    ``gpu`` tests skip cleanly on machines without CUDA."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept
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
