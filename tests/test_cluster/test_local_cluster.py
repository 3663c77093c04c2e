"""The local cluster a render starts is private: loopback only, token authentication on; a
cluster to join that does not answer fails at once, on one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
from helpers import REPO, prompts, run_cli
from helpers import free_port, write_config


def test_local_cluster_listens_on_loopback_only_with_token_auth(ray_local):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert get_authentication_mode() == AuthenticationMode.TOKEN

    cluster = [p for p in psutil.Process().children(recursive=True)
               if any(name in p.name() for name in ("gcs_server", "raylet"))]
    assert cluster, "the local cluster's gcs_server and raylet are children of this process"
    listening = {c.laddr.ip for p in cluster for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


# Joining a cluster that is not there fails within seconds, on one line, with no Ray noise. Each
# case runs in a fresh process whose Ray temp folder is private and empty, so `auto` finds no
# `ray start` record; Ray's own guess (any raylet running on this machine, such as this session's
# cluster) is never made, so nothing here can join, or stop, another cluster.
_CONNECT = """
import json, sys, time
from cluster.connect import connect
started = time.monotonic()
try:
    connect(None if sys.argv[1] == "-" else sys.argv[1])
    print(json.dumps({"joined": True}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                      "seconds": time.monotonic() - started}))
"""
_BOUND_S = 15  # wall clock, Python and Ray imports included
_RAY_NOISE = ("GCS", "rpc_client", "gcs_client", "Failed to connect", "Traceback")


def _ray_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(tmp_path / "ray-tmp"), **extra}


def _connect_elsewhere(address: str | None, env: dict) -> tuple[dict, str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _CONNECT, address or "-"], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr, elapsed


def _assert_one_clear_line(outcome: dict, stderr: str, elapsed: float, *fragments: str) -> None:
    assert outcome.get("error") == "ClusterUnreachable", outcome
    message = outcome["message"]
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert elapsed < _BOUND_S, (elapsed, message)
    assert not [n for n in _RAY_NOISE if n in stderr], stderr[-3000:]


def test_auto_with_no_cluster_on_this_machine_fails_at_once(tmp_path):
    outcome, stderr, elapsed = _connect_elsewhere("auto", _ray_env(tmp_path))
    _assert_one_clear_line(outcome, stderr, elapsed, "cluster.address auto",
                           str(tmp_path / "ray-tmp" / "ray" / "ray_current_cluster"),
                           "ray start --head", "leave cluster.address unset")
    assert stderr.strip() == "", stderr


def test_auto_with_a_stale_ray_start_record_names_the_address_it_tried(tmp_path):
    port = free_port()
    record = tmp_path / "ray-tmp" / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(f"127.0.0.1:{port}")
    outcome, stderr, elapsed = _connect_elsewhere("auto", _ray_env(tmp_path))
    _assert_one_clear_line(outcome, stderr, elapsed, f"127.0.0.1:{port}", str(record),
                           "no Ray cluster answered", "within 5 s", "ray start --head")


def test_host_port_with_nothing_listening_fails_at_once(tmp_path):
    port = free_port()
    outcome, stderr, elapsed = _connect_elsewhere(f"127.0.0.1:{port}", _ray_env(tmp_path))
    _assert_one_clear_line(outcome, stderr, elapsed, f"cluster.address 127.0.0.1:{port}",
                           "no Ray cluster answered there within 5 s", "connection refused",
                           f"ray start --head --port={port}", "fix the address")


def test_ray_address_from_the_environment_is_named_when_nothing_answers(tmp_path):
    port = free_port()
    env = _ray_env(tmp_path, RAY_ADDRESS=f"127.0.0.1:{port}")
    outcome, stderr, elapsed = _connect_elsewhere(None, env)
    _assert_one_clear_line(outcome, stderr, elapsed, f"RAY_ADDRESS 127.0.0.1:{port}",
                           "no Ray cluster answered", "unset it")


def test_a_port_that_answers_but_is_no_ray_cluster_fails_within_the_bound(tmp_path):
    """Ray's own retries (20 tries of up to 40 s by default) are cut short: one try."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    accepted = []

    def accept():  # take connections and say nothing, like a stuck or foreign service
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        outcome, stderr, elapsed = _connect_elsewhere(f"127.0.0.1:{port}", _ray_env(tmp_path))
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert outcome.get("error") == "ClusterUnreachable", outcome
    assert "is not a Ray cluster" in outcome["message"] and "\n" not in outcome["message"]
    assert elapsed < 30, elapsed
    assert not [n for n in _RAY_NOISE if n in stderr], stderr[-3000:]


def test_render_with_address_auto_and_no_cluster_exits_1_with_one_line(tmp_path):
    config = write_config(tmp_path, rows=prompts(2))
    started = time.monotonic()
    result = run_cli("render", config, "--address", "auto",
                     env={"RAY_TMPDIR": str(tmp_path / "ray-tmp"), "RAY_ADDRESS": ""}, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reelfarm: cluster.address auto: no Ray cluster to join"), lines
    assert "ray start --head" in lines[0]
    assert elapsed < _BOUND_S, elapsed
