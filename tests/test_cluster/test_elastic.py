"""A job that follows its cluster (simulated nodes with fake GPUs, as in test_multinode.py):
it waits for GPU capacity, grows onto nodes as they join, and loses nodes, to removal or to a
drain, without spending its rows' attempts and without a budget of replacements."""

from __future__ import annotations

import json
import re
import time

import pytest
from helpers import CliDriver, committed_shards, elastic_config, every_row_ok_once, prompts
from helpers import read_manifest, run_cli, wait_for

from bench.elastic import SLOW_WORKER_DRIVER

pytestmark = pytest.mark.slow


def _rendered_on(out) -> dict[str, int]:
    """Rows per node that rendered them, from the manifest's stage entries."""
    nodes: dict[str, int] = {}
    for row in read_manifest(out):
        (stage,) = row["stages"]
        nodes[stage["node_id"]] = nodes.get(stage["node_id"], 0) + 1
    return nodes


def test_a_job_waits_for_gpu_capacity_then_grows_onto_nodes_as_they_join(cluster, tmp_path):
    # Rows slow enough (about a second each here) that the job outlasts the joined node's model
    # load on a busy machine.
    rows, out = 60, tmp_path / "out"
    with CliDriver("render", elastic_config(tmp_path, rows, steps=24), "--quiet", "--address",
                   cluster.address) as driver:
        wait_for(lambda: (out / "job.json").exists(), 60, "the job to start", driver)
        time.sleep(5)  # no GPU anywhere: its worker waits to be placed
        assert driver.poll() is None and committed_shards(out) == []
        first = cluster.add_node(num_cpus=2, num_gpus=1)
        wait_for(lambda: len(committed_shards(out)) >= 2, 120, "commits on the first node", driver)
        joined_at, joined_wall = time.monotonic(), time.time()
        second = cluster.add_node(num_cpus=2, num_gpus=1)
        _, stderr = driver.communicate(timeout=240)
    assert driver.returncode == 0, stderr[-3000:]
    assert "waiting for GPU capacity: 0 of 1 workers placed and loaded" in stderr
    assert "capacity for 1 more worker(s) appeared" in stderr, stderr[-3000:]
    every_row_ok_once(out, rows)
    by_node = _rendered_on(out)
    assert set(by_node) == {first.node_id, second.node_id} and by_node[second.node_id] > 0
    capacity = json.loads((out / "job.json").read_text())["last_run"]["capacity"]
    assert capacity["joined"] == 1
    status = run_cli("status", str(out)).stdout
    assert "workers: 1 placed as capacity appeared" in status
    # One worker, then two once the second node's has loaded (then fewer, at the tail).
    assert re.search(r"workers over time \(video\): 1 → 2( → 1)?\n", status), status
    placed, loaded = (_logged_at(stderr, text) - joined_wall for text in
                      ("capacity for 1 more worker(s) appeared", "loaded its model on node"))
    print(f"second node: a worker placed {placed:.1f} s and loaded {loaded:.1f} s after it "
          f"joined; {by_node[second.node_id]} of {rows} rows rendered there; the job done "
          f"{time.monotonic() - joined_at:.1f} s after it joined")


def _logged_at(log: str, text: str) -> float:
    """When the first line holding ``text`` was logged (seconds since the epoch)."""
    line = next(line for line in log.splitlines() if text in line)
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000


def test_nodes_lost_more_often_than_any_budget_and_a_drained_node_cost_no_row_an_attempt(
        cluster, tmp_path):
    """Seven nodes removed under the job's one worker, each as soon as its worker has loaded
    (the old budget of replacements allowed six), then one drained with a deadline: every row is
    committed once, ok, at its first attempt, and nothing is rendered on the drained node
    after the drain."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    rows, out, log = 40, tmp_path / "out", tmp_path / "driver.log"
    node = cluster.add_node(num_cpus=2, num_gpus=1)  # the only GPU: the first worker is here
    with CliDriver("render", elastic_config(tmp_path, rows, steps=8, max_workers=1), "--quiet",
                   "--address", cluster.address, log=log) as driver:
        wait_for(lambda: "workers loaded their models" in driver.log_text(), 120,
                 "the first worker", driver)
        spare = cluster.add_node(num_cpus=2, num_gpus=1)
        for loss in range(1, 8):
            cluster.remove_node(node)
            spares = [spare, cluster.add_node(num_cpus=2, num_gpus=1)]  # while it reloads
            wait_for(lambda: driver.log_text().count("loaded its model on node") >= loss, 120,
                     f"the worker after loss {loss}", driver)
            where = re.findall(r"loaded its model on node (\w+)", driver.log_text())[-1]
            node = next(n for n in spares if n.node_id.startswith(where))
            spare = next(n for n in spares if n is not node)
        accepted, why = GcsClient(address=cluster.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "a spot preemption notice", int((time.time() + 1) * 1000))
        assert accepted, why
        drained_at = time.time()
        driver.communicate(timeout=300)
    stderr = driver.log_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert stderr.count("lost with its node; started worker") == 7, stderr[-3000:]
    assert "its node is being drained; it takes no new shards" in stderr, stderr[-3000:]
    table = every_row_ok_once(out, rows)
    assert {r["attempts"] for r in table} == {1}
    after_drain = [r for r in table if r["committed_at"] > drained_at + 3]
    assert after_drain and all(r["stages"][0]["node_id"] != node.node_id for r in after_drain)
    capacity = json.loads((out / "job.json").read_text())["last_run"]["capacity"]
    assert capacity["lost_with_node"] == 7, capacity


def test_no_capacity_within_the_timeout_fails_the_job_in_one_line(cluster, tmp_path):
    result = run_cli("render", elastic_config(tmp_path, 2, capacity_timeout_s=3), "--quiet",
                     "--address", cluster.address)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "reelfarm: no worker could be placed within cluster.capacity_timeout_s = 3 s: are "
        "there enough free GPUs/CPUs for a worker, or can the cluster's autoscaler add nodes?")


def test_a_slow_worker_at_the_tail_is_overtaken_by_a_backup_copy_and_rows_commit_once(
        cluster, tmp_path):
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    rows, out = 8, tmp_path / "out"
    # The slow copy alone would take over 600 s.
    with _driver_with_a_slow_worker(tmp_path, rows, 600, cluster.address) as driver:
        driver.communicate(timeout=240)
    stderr = driver.log_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert (tmp_path / "slow.marker").exists()  # the slow worker did get the row
    assert re.search(r"worker \d+ takes a backup copy of the shard worker \d+ has held", stderr)
    assert re.search(r"stopped: worker \d+ finished its shard's other copy first", stderr)
    table = every_row_ok_once(out, rows)
    assert {r["attempts"] for r in table} == {1}
    capacity = json.loads((out / "job.json").read_text())["last_run"]["capacity"]
    assert capacity["backups"] == 1 and capacity["backups_first"] == 1, capacity
    assert "1 took a backup copy of a late shard at the tail" in run_cli("status", str(out)).stdout


def test_without_backups_the_slow_worker_finishes_its_shard_alone(cluster, tmp_path):
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    rows, out = 8, tmp_path / "out"
    with _driver_with_a_slow_worker(tmp_path, rows, 8, cluster.address, "--set",
                                    "cluster.backups=false") as driver:
        driver.communicate(timeout=240)
    stderr = driver.log_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert (tmp_path / "slow.marker").exists()
    assert "backup copy" not in stderr and "other copy" not in stderr
    every_row_ok_once(out, rows)
    capacity = json.loads((out / "job.json").read_text())["last_run"]["capacity"]
    assert "backups" not in capacity, capacity


def _driver_with_a_slow_worker(tmp_path, rows: int, sleep_s: float, address: str,
                               *args: str) -> CliDriver:
    """``reelfarm render`` of ``rows`` rows on ``address`` whose first worker to get the last
    row sleeps ``sleep_s`` before it; its log in tmp_path/driver.log."""
    return CliDriver(str(tmp_path / "slow.marker"), prompts(rows)[-1]["id"], str(sleep_s),
                     "render", elastic_config(tmp_path, rows), "--quiet", "--address", address,
                     *args, code=SLOW_WORKER_DRIVER, log=tmp_path / "driver.log")
