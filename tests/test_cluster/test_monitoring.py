"""The monitoring files (cluster/monitoring/) read what a job exports, and only that: promtool
checks the alert rules, runs their unit tests and parses every dashboard query, and each metric
named is one ``jobs.run.metrics`` declares, so a renamed metric cannot leave a panel blank."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from helpers import REPO, monitoring_queries, system_tool

from jobs.run.metrics import METRICS, WORKER_STATES

MONITORING = os.path.join(REPO, "cluster", "monitoring")
DASHBOARD = os.path.join(MONITORING, "reelfarm-dashboard.json")
RULES = os.path.join(MONITORING, "reelfarm-alerts.yml")
RULE_TESTS = os.path.join(MONITORING, "reelfarm-alerts.test.yml")
RAY_GPU = "ray_node_gpus_utilization"  # Ray's own, joined by the GPU panel
JOB = "night-2026.01.05"  # a regex metacharacter or two, as output names have


def _exported() -> dict[str, str]:
    """Each name Prometheus scrapes for the declared metrics -> the metric's name."""
    names = {}
    for m in METRICS:
        suffixes = ("_bucket", "_sum", "_count") if m.kind == "histogram" else ("",)
        names.update({f"ray_{m.name}{s}": m.name for s in suffixes})
    return names


def _labels() -> set[str]:
    """Every label a query may name: the declared ones, a histogram's ``le``, Ray's GPU ones."""
    return {label for m in METRICS for label in m.labels} | {"le", "ip", "GpuIndex"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return system_tool("prometheus", "promtool")


def _promtool(promtool: str, *args: str, cwd: str = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def _check_queries(promtool: str, folder, exprs: list[str]) -> subprocess.CompletedProcess:
    """``promtool check rules`` on one recording rule per expression: it parses each as PromQL
    without a server."""
    path = os.path.join(str(folder), "queries.yml")
    rules = [{"record": f"reelfarm:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    with open(path, "w") as f:
        yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}, f)
    return _promtool(promtool, "check", "rules", path)


def _dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def _panels(dashboard: dict) -> list[dict]:
    """The panels that query: every one but the rows."""
    panels = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


def _texts() -> dict[str, str]:
    texts = {}
    for path in (DASHBOARD, RULES, RULE_TESTS):
        with open(path) as f:
            texts[os.path.basename(path)] = f.read()
    return texts


def test_the_alert_rules_pass_promtool_check(promtool):
    result = _promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_the_alert_rules_pass_their_unit_tests(promtool):
    result = _promtool(promtool, "test", "rules", os.path.basename(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    """A unit test that never expects an alert, or never expects silence, proves half of it."""
    with open(RULES) as f:
        (group,) = yaml.safe_load(f)["groups"]
    with open(RULE_TESTS) as f:
        checks = [c for t in yaml.safe_load(f)["tests"] for c in t["alert_rule_test"]]
    assert group["name"] == "reelfarm"
    for rule in group["rules"]:
        name = rule["alert"]
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical"), name
        for text in rule["annotations"].values():
            assert "{{ $labels.reelfarm_job }}" in text, name
        expected = [c["exp_alerts"] for c in checks if c["alertname"] == name]
        assert [] in expected and any(expected), f"{name} is not tested both firing and quiet"


def test_no_worker_placed_counts_every_placed_state():
    """Every state but pending is placed: a state added later must be placed or not, knowingly."""
    with open(RULES) as f:
        (rule,) = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]
                   if r["alert"] == "ReelfarmNoWorkerPlaced"]
    placed = re.search(r'state=~"([^"]+)"', rule["expr"]).group(1).split("|")
    assert sorted(placed) == sorted(s for s in WORKER_STATES if s != "pending")


def test_promtool_refuses_broken_rules_and_queries(promtool, tmp_path):
    """The checks above can fail: a misspelt function is refused, in a rule or in a query."""
    with open(RULES) as f:
        rules = f.read()
    assert "rate(" in rules
    broken = tmp_path / "reelfarm-alerts.yml"
    broken.write_text(rules.replace("rate(", "rtae(", 1))
    result = _promtool(promtool, "check", "rules", str(broken))
    assert result.returncode != 0 and "rtae" in result.stdout + result.stderr

    exprs = [expr.replace("rate(", "rtae(") for _, expr, _ in monitoring_queries(JOB)]
    result = _check_queries(promtool, tmp_path, exprs)
    assert result.returncode != 0 and "rtae" in result.stdout + result.stderr


def test_every_dashboard_query_parses_as_promql(promtool, tmp_path):
    queries = monitoring_queries(JOB)
    assert any(where.startswith("alert: ") for where, _, _ in queries)
    result = _check_queries(promtool, tmp_path, [expr for _, expr, _ in queries])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_dashboard_imports_as_is():
    """Its data source is chosen on import (a variable, no fixed uid), its job from the jobs
    Prometheus knows."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query"
    assert job["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
    assert query == "label_values(ray_reelfarm_rows_to_do, reelfarm_job)"

    ids = [p["id"] for p in dashboard["panels"]]
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    panels = _panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title} has no unit"
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
            assert "[$__rate_interval]" in target["expr"] or "rate(" not in target["expr"], title


def test_every_reelfarm_selector_is_filtered_by_the_job():
    job = re.escape(JOB).replace("\\", "\\\\")
    for where, expr, _ in monitoring_queries(JOB):
        if not where.startswith("dashboard: "):
            continue
        for selector in re.finditer(r"ray_reelfarm_\w+(\{[^}]*\})?", expr):
            assert f'reelfarm_job=~"{job}"' in (selector.group(1) or ""), \
                f"{where}: {selector.group(0)} is not filtered by $job"


def test_every_metric_named_is_one_the_job_exports():
    """A misspelt name would leave a panel blank or an alert silent, and promtool cannot tell."""
    exported = _exported()
    for name, text in _texts().items():
        for metric in set(re.findall(r"\bray_\w+", text)):
            assert metric in exported or metric == RAY_GPU, f"{name}: {metric} is not exported"


def test_every_label_named_is_one_the_metrics_carry():
    """Grouping or matching by a misspelt label silently merges or drops series."""
    labels = _labels()
    named = []
    for where, expr, _ in monitoring_queries(JOB):
        for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
            named += [(where, label.strip()) for label in group.split(",") if label.strip()]
        named += [(where, label) for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)]
    for panel in _panels(_dashboard()):
        for target in panel["targets"]:
            named += [(panel["title"], label)
                      for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"])]
    assert named
    for where, label in named:
        assert label in labels, f"{where}: no metric carries a label {label!r}"


def test_the_dashboard_shows_every_metric_the_job_exports():
    exported = _exported()
    shown = {exported[m] for m in re.findall(r"\bray_\w+", _texts()["reelfarm-dashboard.json"])
             if m in exported}
    assert shown == {m.name for m in METRICS}, {m.name for m in METRICS} - shown


def test_queries_say_what_their_series_need():
    needs = {where: need for where, _, need in monitoring_queries(JOB)}
    assert needs["dashboard: GPU utilization, by stage"] == "cuda"
    assert needs["dashboard: Peak GPU memory, per worker"] == "cuda"
    assert needs["dashboard: CLIP score p50, by stage"] == "scoring"
    assert needs["dashboard: Progress"] is None
    assert needs["alert: ReelfarmNoCommit"] is None


def test_gpu_utilization_and_progress_read_real_looking_series(promtool, tmp_path):
    """Evaluated by promtool on series as Ray exports them: a GPU scraped twice (two targets)
    counts once, a GPU a worker gave back (0) or another job holds counts for no stage, and
    progress is the share of the rows committed."""
    queries = {where: expr for where, expr, _ in monitoring_queries(JOB)}
    ray = 'SessionName="session_1", instance="10.0.0.1:8080", job="ray"'
    worker = f'reelfarm_job="{JOB}", WorkerId="0a1", {ray}'
    series = {
        f'{RAY_GPU}{{ip="10.0.0.1", GpuIndex="0", GpuDeviceName="H100", {ray}}}': 80,
        f'{RAY_GPU}{{ip="10.0.0.1", GpuIndex="0", GpuDeviceName="H100", SessionName="session_1", '
        'instance="ray-head:8080", job="ray-head"}': 80,
        f'{RAY_GPU}{{ip="10.0.0.1", GpuIndex="1", GpuDeviceName="H100", {ray}}}': 40,
        f'{RAY_GPU}{{ip="10.0.0.2", GpuIndex="0", GpuDeviceName="H100", {ray}}}': 10,
        f'{RAY_GPU}{{ip="10.0.0.3", GpuIndex="0", GpuDeviceName="H100", {ray}}}': 99,
        f'ray_reelfarm_worker_gpu{{stage="video", ip="10.0.0.1", GpuIndex="0", {worker}}}': 1,
        f'ray_reelfarm_worker_gpu{{stage="keyframe", ip="10.0.0.1", GpuIndex="1", {worker}}}': 1,
        f'ray_reelfarm_worker_gpu{{stage="keyframe", ip="10.0.0.2", GpuIndex="0", {worker}}}': 0,
        'ray_reelfarm_worker_gpu{stage="keyframe", ip="10.0.0.3", GpuIndex="0", '
        f'reelfarm_job="other", WorkerId="0b2", {ray}}}': 1,
        f"ray_reelfarm_rows_to_do{{{worker}}}": 200,
        f"ray_reelfarm_rows_remaining{{{worker}}}": 50,
    }
    expect = {
        "dashboard: GPU utilization, by stage": [
            {"labels": f'{{reelfarm_job="{JOB}", stage="keyframe"}}', "value": 40},
            {"labels": f'{{reelfarm_job="{JOB}", stage="video"}}', "value": 80}],
        "dashboard: Progress": [{"labels": f'{{reelfarm_job="{JOB}"}}', "value": 0.75}],
    }
    (tmp_path / "none.yml").write_text("groups: []\n")
    tests = {"rule_files": ["none.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": f"{v}x5"} for s, v in series.items()],
        "promql_expr_test": [{"expr": queries[where], "eval_time": "2m", "exp_samples": samples}
                             for where, samples in expect.items()]}]}
    (tmp_path / "queries.test.yml").write_text(yaml.safe_dump(tests))
    result = _promtool(promtool, "test", "rules", "queries.test.yml", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
