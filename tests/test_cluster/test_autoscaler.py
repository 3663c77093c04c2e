"""A job on a cluster with an autoscaler, Ray's own fake multi-node one: the head holds no GPU,
the job asks for GPU workers, the autoscaler launches GPU nodes (processes on this machine,
with fake GPUs) for that request, the job renders there, and when it ends its request is
cleared and the idle nodes are released. The job leaves ``cluster.gpus_per_worker`` at its
default: the autoscaler's node types say GPUs can come, so its workers are GPU workers. Ray's
fake provider, like Ray's own autoscaler, does not report its node types to the GCS; the test
reports them as an autoscaler that does (the cluster config Ray Data and Ray Train read).

The head runs from ``ray start --head --block`` on its own port and temp dir, in its own
process group; the nodes the autoscaler launches are its descendants, and the test stops them
all by the head's pid (never ``ray stop``, which would stop every Ray cluster here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import elastic_config, every_row_ok_once, free_ports, ray_head_env, run_cli
from helpers import stop_process_group, wait_for

pytestmark = pytest.mark.slow

GPU_NODES = 2
HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's ids: the head's, then 00001, 00002, ...


def _autoscaling_config(gcs_port: int) -> dict:
    """Ray's fake multi-node provider: a CPU head, up to GPU_NODES nodes of one fake GPU,
    none at the start, each released after 6 s idle."""
    return {
        "cluster_name": "reelfarm-test", "max_workers": GPU_NODES,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": GPU_NODES}},
        "head_node_type": "ray.head.default", "idle_timeout_minutes": 0.1,
        "upscaling_speed": 1.0, "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


@pytest.fixture(scope="module")
def autoscaling_head():
    tmp = tempfile.mkdtemp(prefix="rf-as-", dir="/tmp")
    env = ray_head_env(tmp)
    (gcs,) = free_ports(1)
    config = os.path.join(tmp, "autoscaling.json")
    with open(config, "w") as f:
        json.dump(_autoscaling_config(gcs), f)
    log = open(os.path.join(tmp, "head.log"), "w")
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
         "--include-dashboard=false", f"--autoscaling-config={config}", "--block"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
        env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    address = f"127.0.0.1:{gcs}"
    try:
        wait_for(lambda: _alive_nodes(address, env) == [HEAD_NODE_ID], 120, "the head", head)
        subprocess.run([sys.executable, "-c", _REPORT_NODE_TYPES, address, str(GPU_NODES)],
                       env=env, check=True, timeout=120)
        yield {"address": address, "env": env}
    finally:
        stop_process_group(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# The autoscaler's node types as an autoscaler reports them to the GCS: up to N nodes of a GPU.
_REPORT_NODE_TYPES = """
import sys
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import ClusterConfig
config = ClusterConfig()
group = config.node_group_configs.add(name="gpu", max_count=int(sys.argv[2]))
group.resources.update({"CPU": 2, "GPU": 1})
GcsClient(address=sys.argv[1]).report_cluster_config(config.SerializeToString())
"""


def _alive_nodes(address: str, env: dict) -> list[str] | None:
    """The ids of the cluster's alive nodes, asked from a process of its own (this one keeps
    its own local Ray); None while the cluster does not answer."""
    result = subprocess.run(
        [sys.executable, "-c", "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                               "print('nodes:', json.dumps(sorted(n['NodeID'] for n in ray.nodes() "
                               "if n['Alive'])))" % address],
        capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        return None
    # The autoscaler's own lines come to a driver's stdout too.
    line = next(line for line in result.stdout.splitlines() if line.startswith("nodes: "))
    return json.loads(line[len("nodes: "):])


def test_the_autoscaler_launches_gpu_nodes_for_the_job_and_releases_them_when_it_ends(
        autoscaling_head, tmp_path):
    rows, out = 16, tmp_path / "out"
    config = elastic_config(tmp_path, rows, steps=8, gpus_per_worker=None)  # the default
    result = run_cli("render", config, "--quiet",
                     "--address", autoscaling_head["address"], env=autoscaling_head["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    table = every_row_ok_once(out, rows)
    # Rendered on the nodes the autoscaler launched for the job's request, not on the head.
    used = {r["stages"][0]["node_id"] for r in table}
    assert used and HEAD_NODE_ID not in used and all(n.startswith("f" * 51) for n in used), used
    assert all(r["stages"][0]["gpu_ids"] for r in table)  # GPU workers, by default
    # The job cleared its request when it ended: the idle GPU nodes are released (a request
    # left standing would hold them).
    wait_for(lambda: _alive_nodes(**autoscaling_head) == [HEAD_NODE_ID], 120,
             "the autoscaler to release the GPU nodes")
