"""What tests share: tiny configs and the files they are written to, Parquet prompt files,
manifests read back, and running the CLI as a user would (to the end, or in the background to
be stopped or killed part way)."""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_prompts(path, rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> str:
    """Write prompt rows to a Parquet file and return its path."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return str(path)


def tiny_config(input_uri: str, output_uri: str, **sections) -> dict:
    """A config that renders in a fraction of a second per row on a CPU."""
    cfg = {
        "input": {"uri": input_uri},
        "model": {"path": "tiny:modelscope"},
        "render": {"num_frames": 8, "height": 32, "width": 32, "num_inference_steps": 2,
                   "seed": 1, "batch_size": 2},
        "encode": {"fps": 8, "crf": 23, "preset": "ultrafast"},
        "output": {"uri": output_uri, "shard_size": 4},
        "cluster": {"num_workers": 2, "shard_timeout_s": 120},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def stages_config(input_uri: str, output_uri: str, keyframe: str = "tiny:sd",
                  video: str = "tiny:ltx-i2v", **sections) -> dict:
    """A two-stage config (a keyframe per prompt, then a video from it) on tiny models."""
    cfg = tiny_config(input_uri, output_uri, **sections)
    del cfg["model"]
    cfg["render"].update(num_frames=9, batch_size=1)  # LTX: 8k+1 frames
    cfg["stages"] = [{"name": "keyframe", "model": {"path": keyframe},
                      "render": {"guidance_scale": 5.0}},
                     {"name": "video", "model": {"path": video}}]
    for stage in cfg["stages"]:
        stage.update(sections.get(f"stage_{stage['name']}", {}))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("stage_")}
    return cfg


def prompts(n: int, prefix: str = "row") -> list[dict]:
    return [{"id": f"{prefix}-{i:03d}", "prompt": f"a small test scene number {i}"} for i in range(n)]


def write_config(folder, cfg: dict | None = None, *, rows: list[dict] | None = None,
                 output_uri: str | None = None, prompts_file: str = "prompts.parquet",
                 name: str = "job.yaml", **sections) -> str:
    """Write a job config to ``folder/name`` (YAML) and return its path.

    The config is ``cfg`` as given; without it, a ``tiny_config`` that reads
    ``folder/prompts_file`` and writes to ``output_uri`` (default ``folder/out``), ``sections``
    merged in. Its prompts are ``rows``, written first; with no rows a prompts file already
    there is kept, and two prompts are written when there is none.
    """
    folder = str(folder)
    if cfg is None:
        src = os.path.join(folder, prompts_file)
        if rows is not None or not os.path.exists(src):
            write_prompts(src, rows if rows is not None else prompts(2))
        cfg = tiny_config(src, output_uri or os.path.join(folder, "out"), **sections)
    else:
        assert rows is None and output_uri is None and not sections, "a config is given whole"
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``reelfarm`` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def read_manifest(output, *, shards: bool = False) -> list[dict]:
    """An output's rows as dicts: its consolidated ``manifest.parquet``, or with ``shards`` the
    rows of its committed shard manifests (the current ones, as verify reads them).
    ``output`` is a local path or any fsspec URL."""
    from jobs.store import manifest

    output = str(output)
    if shards:
        return [row for table in manifest.iter_shards(output) for row in table.to_pylist()]
    if "://" not in output:
        return pq.read_table(os.path.join(output, "manifest.parquet")).to_pylist()
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    # Read whole, then decoded from memory: Arrow reading a Python file object does so from its
    # own threads, which could abort this process at exit.
    with fs.open(f"{root}/manifest.parquet", "rb") as f:
        return pq.read_table(pa.BufferReader(f.read())).to_pylist()


def by_id(rows: list[dict]) -> dict[str, dict]:
    """Rows keyed by their ``id``."""
    return {row["id"]: row for row in rows}


def committed_shards(output) -> list[str]:
    """The shard manifests committed to the local ``output`` so far, in order."""
    return sorted(glob.glob(os.path.join(str(output), "manifests", "shard-*.parquet")))


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str,
             process: subprocess.Popen | None = None) -> None:
    """Poll until ``predicate()`` is true; fail after ``timeout_s``, or as soon as ``process``
    (the one expected to make it true) has exited, with the end of its stderr."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process is not None and process.poll() is not None:
            try:
                stderr = process.communicate(timeout=30)[1] or ""
            except subprocess.TimeoutExpired:  # what it started still holds its pipes
                stderr = ""
            raise AssertionError(f"{what}: the process exited ({process.returncode}) first:\n"
                                 f"{stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class CliDriver(subprocess.Popen):
    """``reelfarm ARGS`` running in the background (or ``python -c CODE ARGS``, a driver that
    wraps the CLI), in a session of its own, its output on pipes; for a test to stop with a
    signal or kill part way.

    Use it in a ``with`` block: leaving it kills whatever is left of the driver's process group,
    the local Ray cluster the driver started included, so nothing outlives the test.
    """

    def __init__(self, *args: str, code: str | None = None, cwd=REPO, env: dict | None = None,
                 log=None):
        """``log``: a file its stderr goes to instead of a pipe, for a test to follow while
        it runs (``log_text``)."""
        command = [sys.executable, *(["-c", code] if code else ["-m", "jobs.cli"]), *args]
        self.log = log
        stderr = open(log, "w") if log else subprocess.PIPE
        super().__init__(command, cwd=str(cwd), env={**os.environ, **(env or {})}, text=True,
                         stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        if log:
            stderr.close()  # the driver holds its own copy

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> tuple[str, str]:
        """Send ``sig`` to the driver alone (as a scheduler or Ctrl-C does) and wait for it to
        exit: its (stdout, stderr)."""
        self.send_signal(sig)
        return self.communicate(timeout=timeout_s)

    def kill_hard(self, timeout_s: float = 30) -> None:
        """SIGKILL the driver alone, as a crash would; its cluster is left to the ``with``."""
        os.kill(self.pid, signal.SIGKILL)
        self.wait(timeout_s)

    def __exit__(self, *exc_info):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone: the driver and all it started
            pass
        return super().__exit__(*exc_info)


def stored(output, row: dict) -> str:
    """Where a manifest row's video is on local disk: its path is relative to the output."""
    return os.path.join(str(output), row["video_uri"])


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (each bound until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def s3_client():
    """A boto3 client of the endpoint the ``s3_env`` fixture points this process at."""
    import boto3

    return boto3.client("s3")


def s3_requests(fs) -> list[tuple[str, str]]:
    """(operation, URL path) of each request ``fs``'s client makes from now on, in a list that
    grows as they are made (the client exists once ``fs`` made a request)."""
    made: list[tuple[str, str]] = []

    def record(model, params, **_) -> None:  # a value returned would stand in for the reply
        made.append((model.name, params["url_path"]))

    fs.s3.meta.events.register("before-call.s3", record)
    return made


def ray_head_env(tmp: str, **extra: str) -> dict:
    """The environment of a ``ray start --head`` a test runs, and of the drivers and clients it
    starts there: Ray's temp dir private to the test (``tmp``, short: Ray's socket paths must
    fit in 107 bytes), token auth on with a token of its own."""
    token_path = os.path.join(tmp, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    bin_dir = os.path.dirname(sys.executable)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=tmp,
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path,
               RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def stop_process_group(head: subprocess.Popen) -> None:
    """Stop a Ray head a test started (``--block``, in its own process group) by its pid:
    SIGTERM to the group, SIGKILL if it lingers (Ray drains up to 30 s on SIGTERM; a test need
    not wait). Everything the head started, the nodes an autoscaler launched included, is in
    the group."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


def system_tool(package: str, *names: str) -> str:
    """The path of a tool of a Debian ``package`` (``names``: what it may be called), which
    ``.ci/run`` installs: without it a test skips here, and fails under CI (``CI`` set)."""
    import shutil

    import pytest

    found = next((path for path in map(shutil.which, names) if path), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but there is no {names[0]} on PATH: .ci/run installs Debian's "
                    f"{package} package (apt-get install {package})")
    pytest.skip(f"no {names[0]} on PATH (apt-get install {package}); under CI this fails instead")


def render_actor_pids(root_pid: int) -> list[int]:
    """The render actors' processes under ``root_pid`` (a test itself, with its local cluster,
    or a Ray head it started): none of another Ray cluster on the machine."""
    import psutil

    pids = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:  # exited while we looked
            continue
        if cmd.startswith("ray::") and "Renderer" in cmd:
            pids.append(proc.pid)
    return pids


def elastic_config(tmp_path, rows: int, steps: int = 4, **cluster) -> str:
    """A tiny job that follows its cluster: GPU workers (one GPU each), as many as it holds."""
    cfg = tiny_config(write_prompts(tmp_path / "prompts.parquet", prompts(rows)),
                      str(tmp_path / "out"), output={"shard_size": 2},
                      render={"num_inference_steps": steps, "batch_size": 1},
                      cluster={"num_workers": None, "gpus_per_worker": 1,
                               "capacity_timeout_s": 120, "shard_timeout_s": 600, **cluster})
    return write_config(tmp_path, cfg)


def every_row_ok_once(out, rows: int) -> list[dict]:
    """The manifest's rows, once each asserted: every row of ``prompts(rows)`` ok, verify clean."""
    from jobs.verify import verify

    table = read_manifest(out)
    assert sorted(r["id"] for r in table) == sorted(p["id"] for p in prompts(rows))
    assert {r["status"] for r in table} == {"ok"}
    assert verify(str(out)).problems == []
    return table


def monitoring_queries(job: str) -> list[tuple[str, str, str | None]]:
    """(where, PromQL, needs) for every expression in the dashboard and the alert rules of
    ``cluster/monitoring/``, the dashboard's variables filled in for ``job`` as Grafana does:
    the queries a test runs against Prometheus. ``where`` is ``"dashboard: <panel title>"``
    (``(refId)`` added where a panel has several) or ``"alert: <name>"``. ``needs`` names what
    a series needs beyond a running job, or is None: ``"cuda"`` (Ray's GPU metrics and the peak
    GPU memory exist only on CUDA nodes), ``"scoring"`` (CLIP scores, only with quality scoring
    on)."""
    import json
    import re

    needs = {"ray_node_gpus_utilization": "cuda", "ray_reelfarm_gpu_memory_peak_bytes": "cuda",
             "ray_reelfarm_clip_score": "scoring"}
    folder = os.path.join(REPO, "cluster", "monitoring")
    with open(os.path.join(folder, "reelfarm-dashboard.json")) as f:
        panels = json.load(f)["panels"]
    panels += [p for row in panels for p in row.get("panels", [])]  # a collapsed row holds its own
    # A multi-value variable goes into =~ as a regex, escaped, in a PromQL string.
    value = re.escape(job).replace("\\", "\\\\")
    found = []
    for panel in panels:
        targets = panel.get("targets", [])
        for target in targets:
            where = f"dashboard: {panel['title']}"
            if len(targets) > 1:
                where += f" ({target['refId']})"
            found.append((where, target["expr"].replace("$job", value)
                          .replace("$__rate_interval", "1m")))
    with open(os.path.join(folder, "reelfarm-alerts.yml")) as f:
        rules = [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]
    found += [(f"alert: {rule['alert']}", rule["expr"].strip())
              for rule in rules if "alert" in rule]
    return [(where, expr, next((need for name, need in needs.items() if name in expr), None))
            for where, expr in found]


def committed_output(uri: str, rows: int, shard_size: int = 100) -> list[dict]:
    """An output of ``rows`` ok rows committed in shards of ``shard_size``, each with a small
    video object, written directly at any fsspec URL: what ``verify`` reads, made in a fraction
    of a second where rendering would take minutes. Returns the records committed."""
    import hashlib

    from jobs.store import manifest
    from rendering import storage

    fs, root = storage.filesystem(uri)
    fs.makedirs(storage.join(root, "videos"), exist_ok=True)
    records, objects = [], {}
    for i in range(rows):
        data, path = f"video of row {i}".encode(), f"videos/row-{i:05d}.mp4"
        objects[storage.join(root, path)] = data
        artifact = {"name": "video", "path": path, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "kind": "video"}
        records.append({"id": f"row-{i:05d}", "row_index": i, "occurrence": 0,
                        "prompt": f"scene {i}", "status": "ok", "video_uri": path,
                        "bytes": artifact["bytes"], "sha256": artifact["sha256"],
                        "artifacts": [artifact]})
    fs.pipe(objects)
    for start in range(0, rows, shard_size):
        manifest.write_shard(uri, records[start:start + shard_size])
    return records


def run_quick_bench(name: str, *args: str) -> dict:
    """``python -m bench.<name> --quick``, which must succeed; the results it saved."""
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "saved " in result.stdout
    with open(result.stdout.rsplit("saved ", 1)[1].split()[0]) as f:
        return json.load(f)


def crash_at_checkpoint(monkeypatch) -> Callable[[], None]:
    """Make a fold of shard manifests die after its segment, as it writes its checkpoint (an
    error storage does not retry); returns what undoes it."""
    from rendering import storage

    create = storage.create_bytes

    def crashing(fs, path, data):
        if "_checkpoint-" in path:
            raise PermissionError("killed")
        create(fs, path, data)

    monkeypatch.setattr(storage, "create_bytes", crashing)
    return lambda: monkeypatch.setattr(storage, "create_bytes", create)
