"""Multi-node behaviour on a Ray cluster simulated on this machine (nodes with fake GPUs).

``ray.cluster_utils.Cluster`` runs several raylets here; each worker node advertises GPUs that
do not exist, so actors are placed and pinned exactly as on a GPU cluster while torch, seeing
no CUDA, renders the tiny model on the CPU. Drivers run in their own processes, as they do on
a real cluster, so this file never touches the session's local Ray.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import REPO, prompts, run_cli, tiny_config, write_prompts

from jobs.audit import verify

pytestmark = pytest.mark.slow

_POOL_PROBE = """
import json, sys
from cluster.connect import connect, default_num_workers
from cluster.pool import WorkerPool
from rendering.contract import EncodeSpec, ModelSpec, WorkerSpec

resources = connect(sys.argv[1])
num_workers, use_gpu = default_num_workers(resources, 1)
spec = WorkerSpec(ModelSpec(sys.argv[2]), EncodeSpec(), output_uri=sys.argv[3], videos_dir="videos",
                  previews_dir="previews",
                  receipts_dir="receipts")
pool = WorkerPool(spec, num_workers, use_gpu, 1, shard_timeout_s=120)
infos = pool.start()
print(json.dumps({"num_workers": num_workers, "use_gpu": use_gpu, "infos": infos,
                  "placements": pool.placements()}))
pool.shutdown()
"""


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # The head holds no GPU, like a head pod that only runs drivers and Ray's own services.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


def test_workers_start_one_per_gpu_across_nodes_and_fetch_the_model_once_per_node(cluster, tmp_path):
    from rendering.tiny import save_tiny_pipeline

    model_dir = tmp_path / "bucket" / "models" / "tiny-modelscope"
    save_tiny_pipeline("modelscope", str(model_dir))
    homes = {}
    for name in ("a", "b"):
        home = tmp_path / f"node-{name}-hf"
        node = cluster.add_node(num_cpus=2, num_gpus=2, env_vars={"HF_HOME": str(home)})
        homes[node.node_id] = home
    cluster.wait_for_nodes()

    probe = subprocess.run([sys.executable, "-c", _POOL_PROBE, cluster.address,
                            f"file://{model_dir}", str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=REPO, timeout=240)
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])

    # Default size: one worker per GPU in the cluster; each pinned to its own GPU of its node.
    assert report["use_gpu"] and report["num_workers"] == 4
    gpus_by_node = defaultdict(list)
    for placement in report["placements"]:
        assert len(placement["gpu_ids"]) == 1
        gpus_by_node[placement["node_id"]] += placement["gpu_ids"]
    assert {node: sorted(gpus) for node, gpus in gpus_by_node.items()} == \
        {node: ["0", "1"] for node in homes}
    # No CUDA here: the GPU-pinned workers fall back to the CPU, as pick_device promises.
    assert {info["device"] for info in report["infos"]} == {"cpu"}

    # Two workers per node, one copy of the model per node, nothing half-copied left behind.
    for home in homes.values():
        cached = os.listdir(home / "reelfarm" / "models")
        assert len(cached) == 1 and cached[0].startswith("tiny-modelscope-"), cached
        assert (home / "reelfarm" / "models" / cached[0] / "model_index.json").exists()


def test_a_node_lost_mid_job_keeps_committed_work_and_the_job_finishes_on_the_others(cluster, tmp_path):
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    rows = 48
    out = tmp_path / "out"
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                      output={"shard_size": 2}, render={"num_inference_steps": 4},
                      cluster={"num_workers": None, "shard_timeout_s": 600})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))

    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", "render", str(tmp_path / "job.yaml"),
                               "--quiet", "--address", cluster.address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # Wait for the first commits, then take a worker node away, workers and all.
        committed = _wait_for_commits(out, driver, at_least=2, timeout_s=120)
        cluster.remove_node(nodes[1])
        stdout, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    elapsed_s = time.monotonic() - started

    assert driver.returncode == 0, stderr[-3000:]
    assert re.search(r"worker \d+ died; started worker \d+", stderr), stderr[-3000:]
    # The remaining nodes finished the job; nothing waited for the 600 s hang timeout.
    assert elapsed_s < 200
    # Every shard committed before the loss is still there, byte for byte.
    for path, data in committed.items():
        with open(path, "rb") as f:
            assert f.read() == data
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == rows and set(table["status"].to_pylist()) == {"ok"}
    assert len(set(table["id"].to_pylist())) == rows
    assert (out / "_SUCCESS").exists()
    audit = verify(str(out))
    assert audit.problems == []
    assert run_cli("verify", str(out)).returncode == 0


def _wait_for_commits(out, driver, at_least: int, timeout_s: float) -> dict[str, bytes]:
    """The shard manifests committed so far (path -> bytes), once there are ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while True:
        paths = sorted(glob.glob(str(out / "manifests" / "shard-*.parquet")))
        if len(paths) >= at_least:
            break
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.1)
    committed = {}
    for path in paths:
        with open(path, "rb") as f:
            committed[path] = f.read()
    return committed
