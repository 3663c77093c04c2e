"""The node-local model cache: URL models copied once per node, hub models read from HF's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import REPO

from rendering import model_cache
from rendering.model_cache import ModelCacheError, cached_path, fetch_url, resolve
from rendering.contract import ModelSpec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from rendering.pipelines.tiny import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("bucket") / "models" / "tiny-modelscope"
    save_tiny_pipeline("modelscope", str(folder))
    return folder


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def _files(folder) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


def test_a_url_model_is_copied_once_into_hf_home_and_loads_from_there(tiny_folder, hf_home):
    from rendering.pipelines.load import load_pipeline

    url = f"file://{tiny_folder}"
    local = resolve(ModelSpec(url))
    assert local == cached_path(url) and local.startswith(str(hf_home / "reelfarm" / "models"))
    assert _files(local) == _files(tiny_folder)
    stamp = os.stat(os.path.join(local, "model_index.json")).st_mtime_ns
    assert fetch_url(url) == local  # cached: not copied again
    assert os.stat(os.path.join(local, "model_index.json")).st_mtime_ns == stamp
    assert [n for n in os.listdir(os.path.dirname(local)) if n.startswith(".")] == []

    pipe = load_pipeline(ModelSpec(url), "cpu")
    assert type(pipe).__name__ == "TextToVideoSDPipeline"


def test_local_folders_are_used_in_place_and_bad_urls_say_what_to_fix(tiny_folder, hf_home, tmp_path):
    assert resolve(ModelSpec(str(tiny_folder))) == str(tiny_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCacheError, match="holds no model_index.json"):
        fetch_url(f"file://{tmp_path / 'empty'}")
    with pytest.raises(ModelCacheError, match="is not a folder"):
        fetch_url(f"file://{tmp_path / 'missing'}")
    assert not os.path.exists(cached_path(f"file://{tmp_path / 'empty'}"))


_FETCH = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from rendering.model_cache import fetch_url
print("waiting", flush=True)
print(json.dumps(fetch_url(sys.argv[1])), flush=True)
"""


def test_workers_on_one_node_copy_the_model_once_while_the_others_wait(tiny_folder, hf_home):
    url = f"file://{tiny_folder}"
    env = {**os.environ, "HF_HOME": str(hf_home)}
    # Hold the node's lock for this model so that every worker queues up on it at once.
    with model_cache.node_lock(os.path.basename(cached_path(url))):
        workers = [subprocess.Popen([sys.executable, "-c", _FETCH, url], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(4)]
        for worker in workers:
            assert worker.stdout.readline().strip() == "waiting"
        time.sleep(1.0)  # let each reach the lock
        assert all(w.poll() is None for w in workers)
    outputs = [w.communicate(timeout=60) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    assert {json.loads(out.strip().splitlines()[-1]) for out, _ in outputs} == {cached_path(url)}
    assert sum("copied" in err for _, err in outputs) == 1
    assert _files(cached_path(url)) == _files(tiny_folder)


def test_a_model_folder_on_s3_is_fetched_for_air_gapped_clusters(tiny_folder, hf_home, monkeypatch):
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        s3 = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=f"http://{host}:{port}")
        s3.mkdir("models-bucket")
        s3.put(str(tiny_folder), "models-bucket/models/tiny-modelscope", recursive=True)

        url = "s3://models-bucket/models/tiny-modelscope"
        local = resolve(ModelSpec(url))
        assert _files(local) == _files(tiny_folder)
        assert os.path.basename(local).startswith("tiny-modelscope-")
    finally:
        server.stop()


_HUB = """
import json, sys
from rendering.model_cache import resolve
from rendering.pipelines.load import load_pipeline
from rendering.contract import ModelSpec
spec = ModelSpec(sys.argv[1])
print(json.dumps([resolve(spec), type(load_pipeline(spec, "cpu")).__name__]))
"""


def test_a_hub_model_in_the_hf_cache_loads_offline(tiny_folder, tmp_path):
    # Lay the model out as huggingface_hub's cache does: refs/main names a snapshot folder.
    home = tmp_path / "hf"
    repo = home / "hub" / "models--acme--tiny-t2v"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    os.symlink(tiny_folder, snapshot, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    found = subprocess.run([sys.executable, "-c", _HUB, "acme/tiny-t2v"], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    path, pipeline = json.loads(found.stdout.strip().splitlines()[-1])
    assert path == str(snapshot) and pipeline == "TextToVideoSDPipeline"


def test_a_hub_model_not_cached_while_offline_says_how_to_fix(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelCacheError, match="not in this node's hub cache .* HF_HUB_OFFLINE is set"):
        resolve(ModelSpec("acme/not-cached"))
