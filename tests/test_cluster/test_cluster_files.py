"""The files that bring a real cluster up parse, and hold the fields reelfarm relies on."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess

import pytest
import ray
import yaml
from helpers import REPO

from jobs.config import validate
from jobs.nightly import for_night

CLUSTER = os.path.join(REPO, "cluster")
KUBERAY = os.path.join(CLUSTER, "kuberay")
PY_TAG = "py311"  # the Python of the image must match the drivers'; see cluster/Dockerfile


def _docs(name: str) -> list[dict]:
    """The file's documents; a RayJob template as the CronJob fills it in for one night."""
    with open(os.path.join(KUBERAY, name)) as f:
        text = f.read()
    if name == "rayjob-nightly.yaml":
        text = text.replace("__NIGHT__", "2026-01-05")
    return list(yaml.safe_load_all(text))


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _dockerfile_image() -> str:
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        return re.search(r"^ARG RAY_IMAGE=(\S+)$", f.read(), re.M).group(1)


def _ray_clusters() -> dict[str, dict]:
    return {"raycluster.yaml": _one("raycluster.yaml", "RayCluster")["spec"],
            "raycluster-autoscaling.yaml": _one("raycluster-autoscaling.yaml", "RayCluster")["spec"],
            "rayjob-nightly.yaml": _one("rayjob-nightly.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def _gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"].get("limits", {})]


def _is_spot(group: dict) -> bool:
    """Whether the group's pods go to spot (preemptible) nodes only: a toleration alone lets them."""
    pod = group["template"]["spec"]
    return "spot" in str([pod.get("nodeSelector"), pod.get("affinity", {}).get("nodeAffinity")]).lower()


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_every_file_is_commented_for_what_a_user_must_change():
    paths = [os.path.join(CLUSTER, "Dockerfile"), os.path.join(CLUSTER, "launcher", "gpu-cluster.yaml")]
    paths += [os.path.join(KUBERAY, n) for n in sorted(os.listdir(KUBERAY)) if n.endswith(".yaml")]
    assert len(paths) == 7
    for path in paths:
        with open(path) as f:
            text = f.read()
        assert text.startswith("#"), f"{path} does not open with a comment saying what it is"
        assert "CHANGE" in text, f"{path} marks nothing a user must change"
        for line in text.splitlines():
            if "example.com" in line or "my-bucket" in line or "ami-0123" in line:
                assert "CHANGE" in line or line.lstrip().startswith("#"), \
                    f"{path}: placeholder without a CHANGE note: {line.strip()}"


def test_the_image_runs_the_ray_and_python_that_reelfarm_is_tested_with():
    image = _dockerfile_image()
    assert image == f"rayproject/ray:{ray.__version__}-{PY_TAG}-gpu"
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert "ENV HF_HOME=/cache/huggingface" in text  # the node-local model cache
    # reelfarm itself, from the build context, at the versions the tests ran with
    assert re.search(r"pip install .*-c constraints\.txt \.\s", text)
    for name, spec in _ray_clusters().items():
        assert spec["rayVersion"] == ray.__version__, name


def test_the_launcher_config_passes_rays_own_validation_and_pins_workers_to_gpus():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(CLUSTER, "launcher", "gpu-cluster.yaml")) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(config))  # what `ray up` runs first
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"GPU": 0}  # no render worker on the head
    assert any("-v /mnt/reelfarm-cache:/cache/huggingface" == o for o in config["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[key]), key
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "raycluster-autoscaling.yaml", "rayjob-nightly.yaml"])
def test_kuberay_clusters_have_token_auth_gpu_workers_and_a_node_local_model_cache(name):
    spec = _ray_clusters()[name]
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(_containers(head["template"]))
    assert spec["workerGroupSpecs"] and _gpu_groups(spec) == spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        (worker,) = _containers(group["template"])
        gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert "num-gpus" not in group["rayStartParams"]  # KubeRay takes it from the limit
        env = {e["name"]: e for e in worker["env"]}
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes[mounts[env["HF_HOME"]["value"]]]["emptyDir"]  # node-local, shared by its workers
        assert env["HF_HUB_OFFLINE"]["value"] in ("0", "1")
        images = {c["image"] for c in _containers(head["template"]) + [worker]}
        assert len(images) == 1


def test_the_autoscaling_cluster_grows_gpu_groups_from_zero_and_lets_idle_ones_go():
    doc = _one("raycluster-autoscaling.yaml", "RayCluster")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"] != _one("raycluster.yaml", "RayCluster")["metadata"]["name"]  # both fit
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["upscalingMode"] == "Default"  # every GPU pod a job asks for at once
    # Idle GPU nodes go at a job's tail, but not between two shards of it.
    assert 60 <= options["idleTimeoutSeconds"] <= 1800
    assert options["resources"]["requests"] and options["resources"]["limits"]
    groups = _gpu_groups(spec)
    assert len({g["groupName"] for g in groups}) == len(groups) == len(spec["workerGroupSpecs"])
    for group in groups:
        name = group["groupName"]
        assert group["minReplicas"] == 0 and group["replicas"] == 0, name  # nothing paid between jobs
        assert isinstance(group["maxReplicas"], int) and group["maxReplicas"] >= 1, name
    # An on-demand group and a spot one, which lands on spot nodes only.
    spot = [g for g in groups if _is_spot(g)]
    assert len(spot) == 1 and len(groups) - len(spot) >= 1
    assert not _is_spot({"template": spec["headGroupSpec"]["template"]})  # the head outlives jobs


def test_the_autoscaling_clusters_gpu_pods_are_the_fixed_clusters_gpu_pods():
    """Same image, env, model cache and GPU tolerations as raycluster.yaml's GPU group."""
    (fixed,) = _one("raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    (fixed_worker,) = _containers(fixed["template"])
    fixed_pod = fixed["template"]["spec"]
    for group in _gpu_groups(_ray_clusters()["raycluster-autoscaling.yaml"]):
        (worker,) = _containers(group["template"])
        pod = group["template"]["spec"]
        name = group["groupName"]
        for key in ("image", "env", "volumeMounts", "resources"):
            assert worker[key] == fixed_worker[key], (name, key)
        assert pod["volumes"] == fixed_pod["volumes"], name
        assert all(t in pod["tolerations"] for t in fixed_pod["tolerations"]), name
        assert group["rayStartParams"] == fixed["rayStartParams"], name


def test_the_autoscaling_cluster_says_how_to_submit_an_elastic_job_and_what_to_change():
    with open(os.path.join(KUBERAY, "raycluster-autoscaling.yaml")) as f:
        text = f.read()
    header = text[:text.index("\napiVersion:")]
    assert "kubectl apply -f cluster/kuberay/raycluster-autoscaling.yaml" in header
    assert "ray job submit" in header and "reelfarm render " in header
    assert re.search(r"--set cluster\.max_workers=\d+", header)  # how to cap a job's spend
    assert "cluster.capacity_timeout_s" in header  # it waits for the first GPU node
    assert "--set cluster.num_workers" not in text  # a fixed count: not for elastic jobs
    name = _one("raycluster-autoscaling.yaml", "RayCluster")["metadata"]["name"]
    assert f"service/{name}-head-svc" in header and f"secret {name} " in header
    lines = text.splitlines()
    for line in lines:
        if re.match(r"\s*(maxReplicas|rayVersion|image):", line):
            assert "CHANGE" in line, f"no CHANGE note: {line.strip()}"
    (spot,) = [g for g in _gpu_groups(_ray_clusters()["raycluster-autoscaling.yaml"]) if _is_spot(g)]
    for label in spot["template"]["spec"].get("nodeSelector", {}):
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{label}:")]
        assert "CHANGE" in line, f"no CHANGE note: {line.strip()}"


def test_the_nightly_rayjob_runs_reelfarm_nightly_on_the_mounted_config_for_its_night():
    rayjob = _one("rayjob-nightly.yaml", "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["metadata"]["labels"]["reelfarm/night"] == "2026-01-05"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("reelfarm nightly ") and "--date 2026-01-05" in entrypoint
    assert entrypoint.endswith(" --ok-if-rows-failed")  # rows that failed are reported, not retried
    config_path = entrypoint.split()[2]
    (head,) = _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])
    (mount,) = [m for m in head["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    volumes = {v["name"]: v for v in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    configmap = _one("nightly-config.yaml", "ConfigMap")
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert os.path.basename(config_path) in configmap["data"]

    # The embedded reelfarm config is a valid job config with dated input and output.
    cfg = validate(yaml.safe_load(configmap["data"][os.path.basename(config_path)]))
    assert cfg.cluster.address is None  # ray job submit's RAY_ADDRESS decides
    night = for_night(cfg, dt.date(2026, 1, 5))
    assert night.output.uri.endswith("/2026-01-05") and "2026-01-05" in night.input.uri
    assert cfg.model.path.startswith("s3://")  # fetched once per node, air-gap friendly


def test_the_cronjob_creates_the_nights_rayjob_from_its_configmap_and_may_do_only_that():
    cron = _one("nightly-cronjob.yaml", "CronJob")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    assert "s/__NIGHT__/${night}/g" in script and "kubectl create -f -" in script
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == "reelfarm-nightly-rayjob"
    assert f"{mount['mountPath']}/rayjob.yaml" in script

    role = _one("nightly-cronjob.yaml", "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list"]}]
    binding = _one("nightly-cronjob.yaml", "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == role["metadata"]["name"]

    # The night is the date of the Job's scheduled time (its name's suffix), also on a retry.
    night_line = next(line for line in script.splitlines() if line.strip().startswith("night="))
    scheduled = int(dt.datetime(2026, 1, 5, 2, 0, tzinfo=dt.timezone.utc).timestamp() // 60)
    night = subprocess.run(["bash", "-c", f"{night_line.strip()}; echo $night"],
                           env={"JOB_NAME": f"reelfarm-nightly-{scheduled}", "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert night == "2026-01-05"
