"""A job's metrics as its operators see them: scraped from a real ``ray start`` cluster's metrics
endpoint, and by a real Prometheus server (Debian's package) that evaluates every query of the
dashboard and the alert rules; and ``reelfarm status`` of the job while it runs."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter

import pyarrow as pa
import pytest
import yaml
from helpers import (REPO, CliDriver, committed_shards, free_ports, monitoring_queries, prompts,
                     ray_head_env, read_manifest, render_actor_pids, run_cli, stop_process_group,
                     system_tool, tiny_config, wait_for, write_config, write_prompts)

from jobs.run.metrics import BY_NAME, METRICS

MONITORING = os.path.join(REPO, "cluster", "monitoring")
JOB = "metrics-night"
# The failing rows first: their shard commits early, so a rate over their counter has samples.
ROWS = [{"id": "no-prompt", "prompt": ""}, {"id": "odd-size", "prompt": "a cat"}] + prompts(32)

pytestmark = pytest.mark.slow


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _start(command: list[str], env: dict, cwd: str, log: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A Ray head exporting metrics, a Prometheus scraping it every second, and one job run to
    the end there, with ``reelfarm status`` read while it ran."""
    prometheus = system_tool("prometheus", "prometheus")
    tmp = tempfile.mkdtemp(prefix="rfm", dir="/tmp")  # short: Ray's socket paths
    folder = tmp_path_factory.mktemp("metrics")
    gcs, metrics_port, prom_port = free_ports(3)
    env = ray_head_env(tmp)
    head = _start(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                   "--num-cpus=3", "--num-gpus=0", f"--metrics-export-port={metrics_port}",
                   "--include-dashboard=false", "--block"], env, tmp, os.path.join(tmp, "head.log"))
    # The shipped config and rules, Ray's service-discovery file in the test's folder, and a
    # scrape every second.
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [f"{tmp}/discovery.json"]
    with open(os.path.join(tmp, "discovery.json"), "w") as f:
        json.dump([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{metrics_port}"]}], f)
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        yaml.safe_dump(config, f)
    shutil.copy(os.path.join(MONITORING, "reelfarm-alerts.yml"), tmp)
    server = _start([prometheus, f"--config.file={tmp}/prometheus.yml",
                     f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"],
                    env, tmp, os.path.join(tmp, "prometheus.log"))
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{prom_port}/-/ready"), 60, "prometheus ready",
                 server)
        source = write_prompts(folder / "prompts.parquet", pa.Table.from_pylist(
            [{**r, "height": 36 if r["id"] == "odd-size" else None} for r in ROWS]))
        out = str(folder / "out")
        cfg = tiny_config(source, out, output={"shard_size": 2},
                          render={"num_inference_steps": 80, "batch_size": 1},  # outlasts a lease renewal
                          quality={"clip_model": "tiny:clip"},
                          cluster={"address": f"127.0.0.1:{gcs}"})
        seen = []
        with CliDriver("render", write_config(folder, cfg), "--job-name", JOB, "--quiet",
                       "--ok-if-rows-failed", env=env) as driver:
            # The first shard (the failing rows) commits with no worker: wait for a rendered one.
            wait_for(lambda: len(committed_shards(out)) >= 2, 240, "a rendered shard", driver)
            os.kill(render_actor_pids(head.pid)[0], signal.SIGKILL)  # its rows are retried

            def running() -> bool:
                seen.append(run_cli("status", out, env=env).stdout)
                return "rows/s" in seen[-1]

            wait_for(running, 240, "status showing the running job's figures", driver)
            stdout, stderr = driver.communicate(timeout=300)
            assert driver.returncode == 0, stderr[-3000:]
        # The moment Prometheus holds the job's last figures (its gauges leave Ray's endpoint
        # about 20 s after the driver exits): the queries are evaluated as of then.
        prometheus_url, last = f"http://127.0.0.1:{prom_port}", []

        def holds_the_end() -> bool:
            last.append(time.time())
            return bool(_query(prometheus_url, f'ray_reelfarm_rows_remaining{{reelfarm_job="{JOB}"}} '
                                               f'== 0', last[-1]))

        wait_for(holds_the_end, 60, "prometheus holding the job's last figures")
        yield {"out": out, "env": env, "status": seen[-1], "at": last[-1],
               "ray": f"http://127.0.0.1:{metrics_port}/metrics", "prometheus": prometheus_url}
    finally:
        server.terminate()
        server.wait(timeout=30)
        stop_process_group(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _query(prometheus: str, expr: str, at: float) -> list:
    """The series ``expr`` evaluates to at Unix time ``at``, through Prometheus' HTTP API."""
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at})
    body = json.loads(_get(url))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _ready(url: str) -> bool:
    try:
        return "Ready" in _get(url)
    except OSError:
        return False


def _scraped(url: str) -> dict[str, list]:
    """This job's samples on Ray's endpoint, by sample name, parsed as Prometheus parses them."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(_get(url)):
        for sample in family.samples:
            if sample.labels.get("reelfarm_job") == JOB:
                samples.setdefault(sample.name, []).append(sample)
    return samples


def _midpoint(bounds: tuple, value: float) -> float:
    """The middle of the histogram bucket ``value`` falls in (twice the last bound above it)."""
    lower = 0.0
    for upper in bounds:
        if value <= upper:
            return (lower + upper) / 2
        lower = upper
    return 2.0 * bounds[-1]


def _total(samples: list, **labels) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_the_counters_on_rays_endpoint_equal_the_manifests_counts(farm):
    rows = read_manifest(farm["out"])
    ok = [r for r in rows if r["status"] == "ok"]
    failed = Counter((r["failed_stage"] or "input", r["error_code"]) for r in rows
                     if r["status"] == "failed")
    assert len(ok) == 32 and sum(failed.values()) == 2  # the empty prompt, the odd size
    samples = _scraped(farm["ray"])
    committed = samples["ray_reelfarm_rows_committed_total"]
    assert _total(committed, status="ok") == len(ok)
    assert _total(committed, status="failed") == 2
    by_code = Counter({(s.labels["stage"], s.labels["error_code"]): s.value
                       for s in samples["ray_reelfarm_rows_failed_total"]})
    assert by_code == failed
    assert _total(samples["ray_reelfarm_rows_made_total"], stage="video") == len(ok)
    retried = sum(r["attempts"] - 1 for r in ok)  # the killed worker's rows
    assert retried >= 1
    assert _total(samples["ray_reelfarm_rows_retried_total"], stage="video",
                  error_code="worker_lost") == retried
    assert _total(samples["ray_reelfarm_bytes_written_total"]) == sum(
        a["bytes"] for r in ok for a in r["artifacts"])
    for phase in ("render", "encode", "upload", "score"):
        assert _total(samples["ray_reelfarm_row_seconds_count"], phase=phase) == len(ok), phase
    assert _total(samples["ray_reelfarm_clip_score_count"]) == len(ok)
    # Ray exports a histogram's _sum as each observation's bucket midpoint (Ray 2.60).
    assert _total(samples["ray_reelfarm_clip_score_sum"]) == pytest.approx(
        sum(_midpoint(BY_NAME["reelfarm_clip_score"].boundaries, r["clip_score"]) for r in ok))


def test_every_query_of_the_dashboard_and_the_alerts_finds_series_in_prometheus(farm):
    """Queried as of the job's end (its gauges go with its driver): no panel or alert reads a
    name or label that is not there. Only Ray's CUDA metrics are absent on CPUs."""
    def query(expr: str) -> list:
        return _query(farm["prometheus"], expr, farm["at"])

    did_not_happen = _did_not_happen(farm["out"])
    empty, needs_cuda = [], []
    for where, expr, needs in monitoring_queries(JOB):
        if where.startswith("alert:"):
            # An alert's expression is empty unless it fires: each series it selects must exist.
            selectors = _selectors(expr)
            assert selectors, (where, expr)
            results = [query(s) for s in selectors]
        else:
            results = [query(expr)]
        if needs == "cuda":
            needs_cuda.append(where)
        elif not all(results) and not any(name in expr for name in did_not_happen):
            empty.append((where, expr))
    assert empty == []
    assert needs_cuda  # the GPU panels exist, and are the only ones allowed no data here


def _did_not_happen(out: str) -> list[str]:
    """The counters of what this run did not do, which have no series (Ray cannot count 0)."""
    with open(os.path.join(out, "job.json")) as f:
        run = json.load(f)["last_run"]
    return [name for name, happened in (("reelfarm_pool_events_total", run.get("capacity")),
                                        ("reelfarm_rows_recovered_total", run["recovered"]))
            if not happened]


def _selectors(expr: str) -> list[str]:
    """The reelfarm series an expression selects (name and label matchers)."""
    return sorted(set(re.findall(r"ray_reelfarm_\w+(?:\{[^}]*\})?", expr)))


def test_prometheus_loaded_the_shipped_alert_rules(farm):
    body = json.loads(_get(f"{farm['prometheus']}/api/v1/rules"))
    (group,) = body["data"]["groups"]
    assert group["name"] == "reelfarm" and len(group["rules"]) >= 4
    assert {r["health"] for r in group["rules"]} == {"ok"}


def test_every_metric_is_exported(farm):
    """Every declared metric reaches Ray's endpoint, except the CUDA ones (no GPU here) and the
    counters of what this run did not do."""
    names = set(_scraped(farm["ray"]))
    missing = [m.name for m in METRICS if not any(n.startswith(f"ray_{m.name}") for n in names)]
    assert sorted(missing) == sorted(["reelfarm_worker_gpu", "reelfarm_gpu_memory_peak_bytes",
                                      *_did_not_happen(farm["out"])])


def test_status_shows_the_running_jobs_live_figures_and_not_once_it_ended(farm):
    live = farm["status"]
    assert "running since" in live and "rows committed by this run" in live
    assert re.search(r"video: [0-9.]+ rows/s, workers .*[0-9]+ (busy|ready)", live), live
    after = run_cli("status", farm["out"], env=farm["env"])
    assert after.returncode == 0 and "running since" not in after.stdout
    assert "34 of 34 rows committed (complete)" in after.stdout
