"""Multi-node behaviour on a Ray cluster simulated on this machine (nodes with fake GPUs).

``ray.cluster_utils.Cluster`` runs several raylets here; each worker node advertises GPUs that
do not exist, so actors are placed and pinned exactly as on a GPU cluster while torch, seeing
no CUDA, renders the tiny model on the CPU. Drivers run in their own processes, as they do on
a real cluster, so this file never touches the session's local Ray. Multi-stage jobs get a pool
per stage: their drivers record where Ray placed each worker (node and GPU ids).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, prompts, run_cli, stages_config, tiny_config, write_prompts
from helpers import CliDriver, committed_shards, read_manifest, wait_for, write_config

from jobs.verify import verify

pytestmark = pytest.mark.slow

_POOL_PROBE = """
import json, sys
from cluster.connect import connect, default_num_workers
from cluster.pool import WorkerPool
from rendering.contract import EncodeSpec, ModelSpec, WorkerSpec

resources = connect(sys.argv[1])
num_workers, use_gpu = default_num_workers(resources, 1)
spec = WorkerSpec(ModelSpec(sys.argv[2]), EncodeSpec(), output_uri=sys.argv[3], artifact_dir="videos",
                  previews_dir="previews",
                  receipts_dir="receipts")
pool = WorkerPool(spec, num_workers, use_gpu, 1, shard_timeout_s=120)
infos = pool.start()
print(json.dumps({"num_workers": num_workers, "use_gpu": use_gpu, "infos": infos,
                  "placements": pool.placements()}))
pool.shutdown()
"""

# ``reelfarm render`` as the CLI runs it, with the pools' placements (Ray's own: each worker's node
# and the GPU ids it was pinned to) written as JSON lines to argv[1]: every pool's workers once
# they have started ("started": the driver asks for them to log where they run), and the
# workers it has at the end of the job ("final", null for one that was not placed within 60 s),
# replacements included, whether or not they loaded their model in time to take a shard. Keyed
# by the pool's artifact: a stage's name, "video" for the last.
_DRIVER_RECORDING_PLACEMENTS = """
import json, sys
import ray
from cluster.pool import WorkerPool
from jobs.cli import main

record_to = sys.argv.pop(1)

def record(event, pool, placements):
    with open(record_to, "a") as f:
        f.write(json.dumps({"event": event, "stage": pool.spec.artifact_name,
                            "placements": placements}) + "\\n")

placements = WorkerPool.placements
def recorded_placements(self):  # the first call, as the workers start (the live figures call it later)
    out = placements(self)
    if not getattr(self, "recorded_start", False):
        self.recorded_start = True
        record("started", self, out)
    return out
WorkerPool.placements = recorded_placements

def placed(ref, ready):
    try:
        return ray.get(ref) if ref in ready else None
    except ray.exceptions.RayError as exc:
        return {"error": type(exc).__name__}

shutdown = WorkerPool.shutdown
def recorded_shutdown(self):
    refs = [worker.actor.placement.remote() for worker in self._workers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60)
    record("final", self, [placed(ref, ready) for ref in refs])
    shutdown(self)
WorkerPool.shutdown = recorded_shutdown

sys.exit(main(sys.argv[1:]))
"""


def test_workers_start_one_per_gpu_across_nodes_and_fetch_the_model_once_per_node(cluster, tmp_path):
    from rendering.pipelines.tiny import save_tiny_pipeline

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
    rows = 72
    out = tmp_path / "out"
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                      output={"shard_size": 2}, render={"num_inference_steps": 4},
                      cluster={"num_workers": None, "shard_timeout_s": 600})
    config = write_config(tmp_path, cfg)

    started = time.monotonic()
    log = tmp_path / "driver.log"
    with CliDriver("render", config, "--quiet", "--address", cluster.address, log=log) as driver:
        # Wait until every node's worker takes shards (an elastic pool starts with the first
        # loaded) and the first commits, then take a worker node away, workers and all.
        wait_for(lambda: _loaded_workers(driver.log_text()) == len(nodes), 120,
                 "every node's worker loaded", driver)
        committed = _wait_for_commits(out, driver, at_least=2, timeout_s=120)
        cluster.remove_node(nodes[1])
        driver.communicate(timeout=240)
    elapsed_s = time.monotonic() - started
    stderr = driver.log_text()

    assert driver.returncode == 0, stderr[-3000:]
    # A loss with its node: the pool (elastic: one worker at least) goes on with the others.
    assert re.search(r"worker \d+ lost with its node; \d+ shard\(s\) to retry", stderr), \
        stderr[-3000:]
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


def test_a_two_stage_job_gives_every_worker_of_each_stage_its_own_gpu(cluster, tmp_path):
    # Four GPUs on three nodes: the stages ask for exactly four workers of one GPU each.
    gpus = {cluster.add_node(num_cpus=2, num_gpus=n).node_id: n for n in (2, 1, 1)}
    cluster.wait_for_nodes()
    rows, out = 6, tmp_path / "out"
    # No backup copies: a late shard's copy, once stopped, takes its worker with it and a fresh
    # one is appended, which would list the same GPUs in another order at the end.
    cfg = _two_stage_job(tmp_path, rows, out)
    cfg["cluster"]["backups"] = False
    with _start_driver(cfg, tmp_path, cluster) as driver:
        _, stderr = driver.communicate(timeout=240)
    assert driver.returncode == 0, stderr[-3000:]

    started = _recorded(tmp_path, "started")
    assert {stage: len(workers) for stage, workers in started.items()} == \
        {"keyframe": 1, "video": 3}
    # Each worker pinned to one GPU, and every GPU of the cluster to one worker: none shared,
    # none on the GPU-less head.
    gpus_by_node = defaultdict(list)
    for placement in started["keyframe"] + started["video"]:
        assert len(placement["gpu_ids"]) == 1, placement
        gpus_by_node[placement["node_id"]] += placement["gpu_ids"]
    assert {node: sorted(ids) for node, ids in gpus_by_node.items()} == \
        {node: [str(i) for i in range(n)] for node, n in gpus.items()}
    # The driver's log says the same, stage by stage.
    video_nodes = len({p["node_id"] for p in started["video"]})
    assert re.search(r"keyframe: 1 worker\(s\) on 1 node\(s\), device cpu, pid\(s\) \d+$",
                     stderr, re.M), stderr[-3000:]
    assert re.search(rf"video: 3 worker\(s\) on {video_nodes} node\(s\), device cpu, "
                     r"pid\(s\) \d+ \d+ \d+$", stderr, re.M), stderr[-3000:]
    figures = json.loads((out / "job.json").read_text())["last_run"]
    assert {stage: f["workers"] for stage, f in figures["stages"].items()} == \
        {"keyframe": 1, "video": 3}
    assert (figures["workers_moved"], figures["workers_replaced"]) == (0, 0)
    assert _recorded(tmp_path, "final") == started
    _assert_every_row_ok_once(out, rows)


def test_a_node_of_video_workers_lost_mid_job_keeps_committed_work_and_a_spare_gpu_takes_over(
        cluster, tmp_path):
    # Five GPU nodes for four workers: one is left free for a replacement.
    nodes = {node.node_id: node
             for node in (cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(5))}
    cluster.wait_for_nodes()
    rows, out = 40, tmp_path / "out"
    with _start_driver(_two_stage_job(tmp_path, rows, out), tmp_path, cluster) as driver:
        # Wait for the first commits, then take away a node that holds a video worker.
        committed = _wait_for_commits(out, driver, at_least=2, timeout_s=150)
        kept = _committed_artifacts(out, committed)
        started = _recorded(tmp_path, "started")  # recorded before any shard was submitted
        keyframe_node = started["keyframe"][0]["node_id"]
        video_nodes = [p["node_id"] for p in started["video"]]
        spare = set(nodes) - {keyframe_node, *video_nodes}
        assert len(spare) == 1 and keyframe_node not in video_nodes, started
        cluster.remove_node(nodes[video_nodes[0]])
        _, stderr = driver.communicate(timeout=240)

    assert driver.returncode == 0, stderr[-3000:]
    assert re.search(r"worker \d+ lost with its node; started worker \d+, \d+ shard\(s\) to "
                     r"retry", stderr), stderr[-3000:]
    # The lost worker's replacement went to the one free GPU; the others stayed where they were
    # (those idle at the tail retired before the end).
    final = _recorded(tmp_path, "final")
    assert final["keyframe"] == started["keyframe"]
    allowed = [(node, ["0"]) for node in [*video_nodes[1:], *spare]]
    assert final["video"] and all((p["node_id"], p["gpu_ids"]) in allowed
                                  for p in final["video"]), final
    assert json.loads((out / "job.json").read_text())["last_run"]["workers_replaced"] == 1
    # The shard the lost worker was rendering went to another video worker, at no cost to
    # its rows' attempts (the node went, not the rows' fault); no keyframe was made twice.
    rows_attempts = [[s["attempts"] for s in row["stages"]] for row in read_manifest(out)]
    assert {keyframe for keyframe, _ in rows_attempts} == {1}
    assert {video for _, video in rows_attempts} == {1}, rows_attempts
    capacity = json.loads((out / "job.json").read_text())["last_run"]["capacity"]
    assert capacity["lost_with_node"] == 1, capacity
    # What was committed before the loss is still there, byte for byte and never rewritten:
    # the shard manifests, and the keyframes and videos they list.
    for path, data in committed.items():
        with open(path, "rb") as f:
            assert f.read() == data
    for path, (data, mtime_ns) in kept.items():
        with open(path, "rb") as f:
            assert f.read() == data, path
        assert os.stat(path).st_mtime_ns == mtime_ns, path
    _assert_every_row_ok_once(out, rows)


def test_nodes_in_other_folders_write_one_output_where_the_driver_names_it(cluster, tmp_path,
                                                                         monkeypatch):
    # Each node's raylet, and so its workers, runs in a folder of its own, as on machines where
    # `ray start` ran in different places; the driver runs in a third.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(8)), "unused",
                      cluster={"num_workers": 2})
    config = write_config(tmp_path, cfg)
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "render", config,
                             "--output", "out/x", "--quiet", "--address", cluster.address],
                            capture_output=True, text=True, cwd=driver_dir, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = driver_dir / "out" / "x"
    assert len(os.listdir(out / "videos")) == 8 and (out / "_SUCCESS").exists()
    assert not (tmp_path / "a" / "out").exists() and not (tmp_path / "b" / "out").exists()
    assert not (out / "_probes").exists()  # read back, then removed
    assert verify(str(out)).problems == []


def test_a_two_stage_job_grows_both_stages_onto_a_node_that_joins(cluster, tmp_path):
    first = cluster.add_node(num_cpus=2, num_gpus=2)  # one worker a stage
    cluster.wait_for_nodes()
    # Enough rows (about 20 s of rendering here) that the job outlasts the joined node's loads.
    rows, out, log = 96, tmp_path / "out", tmp_path / "driver.log"
    cfg = stages_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                        output={"shard_size": 2}, render={"num_inference_steps": 48},
                        cluster={"num_workers": None, "shard_timeout_s": 600})
    with CliDriver("render", write_config(tmp_path, cfg), "--quiet", "--address",
                   cluster.address, log=log) as driver:
        _wait_for_commits(out, driver, at_least=2, timeout_s=150)
        second = cluster.add_node(num_cpus=2, num_gpus=2)
        driver.communicate(timeout=300)
    stderr = driver.log_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert re.search(r"the cluster now holds 4 GPUs \(it held 2\): workers from keyframe 1, "
                     r"video 1 to keyframe \d, video \d", stderr), stderr[-3000:]
    table = read_manifest(out)
    assert len(table) == rows and {r["status"] for r in table} == {"ok"}
    nodes = {entry["node_id"] for row in table for entry in row["stages"]}
    assert nodes == {first.node_id, second.node_id}  # rows were rendered on the joined node
    assert verify(str(out)).problems == []


def _two_stage_job(tmp_path, rows: int, out) -> dict:
    """A keyframe stage of one worker and a video stage of three, one GPU each."""
    return stages_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)), str(out),
                         output={"shard_size": 2},
                         cluster={"num_workers": None, "shard_timeout_s": 600},
                         stage_keyframe={"resources": {"gpus": 1, "workers": 1}},
                         stage_video={"resources": {"gpus": 1, "workers": 3}})


def _start_driver(cfg: dict, tmp_path, cluster) -> CliDriver:
    """``reelfarm render`` on the cluster, in its own process, recording its pools' placements."""
    return CliDriver(str(tmp_path / "placements.jsonl"), "render", write_config(tmp_path, cfg),
                     "--quiet", "--address", cluster.address, code=_DRIVER_RECORDING_PLACEMENTS)


def _recorded(tmp_path, event: str) -> dict[str, list[dict]]:
    """The placements the driver recorded for ``event``, per stage."""
    out = defaultdict(list)
    with open(tmp_path / "placements.jsonl") as f:
        for line in f:
            entry = json.loads(line)
            if entry["event"] == event:
                out[entry["stage"]] += entry["placements"]
    return dict(out)


def _committed_artifacts(out, committed: dict[str, bytes]) -> dict[str, tuple[bytes, int]]:
    """Every artifact the committed shard manifests list: path -> (bytes, mtime in ns)."""
    kept = {}
    for data in committed.values():
        for row in pq.read_table(pa.BufferReader(data)).to_pylist():
            assert row["status"] == "ok", row
            for artifact in row["artifacts"]:
                path = str(out / artifact["path"])
                with open(path, "rb") as f:
                    kept[path] = (f.read(), os.stat(path).st_mtime_ns)
    assert {p.split(os.sep)[-2] for p in kept} == {"keyframe", "videos"}
    return kept


def _assert_every_row_ok_once(out, rows: int) -> None:
    """Every input row committed exactly once, ok in both stages, with its keyframe and its
    video stored as the manifest says; nothing else stored; ``verify`` agrees."""
    ids = [p["id"] for p in prompts(rows)]
    shards = [r for path in committed_shards(out) for r in pq.read_table(path).to_pylist()]
    assert sorted(r["id"] for r in shards) == ids
    table = read_manifest(out)
    assert [r["id"] for r in table] == ids
    for row in table:
        assert (row["status"], row["failed_stage"]) == ("ok", None), row
        assert [(s["name"], s["status"]) for s in row["stages"]] == \
            [("keyframe", "ok"), ("video", "ok")]
        artifacts = {a["name"]: a for a in row["artifacts"]}
        assert set(artifacts) == {"keyframe", "video"}
        assert artifacts["keyframe"]["path"].startswith("stages/keyframe/") and \
            artifacts["keyframe"]["path"].endswith(".png")
        assert (artifacts["video"]["path"], artifacts["video"]["sha256"]) == \
            (row["video_uri"], row["sha256"])
        for artifact in artifacts.values():
            with open(out / artifact["path"], "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == artifact["sha256"]
    assert len(os.listdir(out / "stages" / "keyframe")) == len(os.listdir(out / "videos")) == rows
    assert (out / "_SUCCESS").exists()
    assert verify(str(out)).problems == []
    assert run_cli("verify", str(out)).returncode == 0


def _loaded_workers(log: str) -> int:
    """Workers taking shards, from a driver's log: those the pool started with and those that
    loaded their model later."""
    first = re.search(r"(\d+) worker\(s\) on \d+ node\(s\)", log)
    return (int(first.group(1)) if first else 0) + log.count("loaded its model on node")


def _wait_for_commits(out, driver, at_least: int, timeout_s: float) -> dict[str, bytes]:
    """The shard manifests committed so far (path -> bytes), once there are ``at_least``."""
    paths = []

    def enough() -> bool:
        paths[:] = committed_shards(out)
        return len(paths) >= at_least

    wait_for(enough, timeout_s, "a shard committed in time", driver)
    committed = {}
    for path in paths:
        with open(path, "rb") as f:
            committed[path] = f.read()
    return committed
