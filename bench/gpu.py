"""GPU benchmark: reelfarm against a plain diffusers loop on full-size models, and the options.

Full-size random-weight models built from the published configs (bench/full_size_models.py),
with no network, are saved once as diffusers folders under bench/out/gpu/ (about 3.4 GB and
14 GB in fp16), so that both contenders load the same weights with from_pretrained, as a user's
own loop would:
  - ModelScope text-to-video 1.7B (UNet3D + OpenCLIP-H text encoder + SD VAE), 16x256x256
  - Wan 2.1 T2V 1.3B (DiT + UMT5-XXL text encoder + Wan VAE), 33x480x832
Per model, three parts:
  options   ``python -m bench.options --device cuda`` for the model: the effect of every
            optimize.* option, of bf16 and of batch size, with peak GPU memory (its own JSON;
            Wan's at 10 of its 30 steps, so that most variants fit in one command)
  plain     a hand-written fp16 diffusers loop: load, render one video at a time, encode with
            ffmpeg, write; videos/hour after a warm-up, and GPU busy fraction (nvidia-smi)
  reelfarm  ``reelfarm render``, one worker, fp16, batch_size swept, with its best lossless
            settings: the fastest variant of the options part that computes what the plain
            loop computes (an attention kernel, compilation, VAE slicing), never FirstBlockCache,
            VAE tiling or bf16, which change the pixels, so the comparison is like for like
and achieved FLOP/s (FLOPs counted by torch.utils.flop_counter on the meta device) against a
measured fp16 matmul peak. Each part is merged into bench/out/gpu_<model>.json, so parts run
as separate commands add up. A lent GPU allows 10 minutes per command, so run one model's
parts in two (nothing here has run on a GPU yet: the sizes are estimates; the options part
starts no variant after 6 minutes, and saves after each one):

    python -m bench.gpu --models modelscope --parts options      # builds and saves the model first
    python -m bench.gpu --models modelscope --parts plain reelfarm
    python -m bench.gpu --models wan --parts options             # Wan: about 14 GB to save first
    python -m bench.gpu --models wan --parts plain reelfarm
    python -m bench.gpu --quick     # anywhere: tiny models on the CPU, checks the code paths

The quick mode's videos are large enough (64x64, 16 steps) and its reelfarm runs far enough
apart (1 and 17 videos) that the extra videos, not start-up noise, make the difference in wall
time, and both runs join one local Ray cluster started for them, so that Ray's own start (a
second or two of noise on a busy CPU) is left out of both; the plain loop renders 4.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

from bench import options
from bench.common import OUT, REPO, machine, python, run_process, save, steady_rate
from bench.full_size_models import SPECS, ensure_model, modules

# Per model: the video counts of the two reelfarm runs (the plain loop renders the larger) and
# the batch sizes swept, sized so that the plain and reelfarm parts fit in one command.
RUNS = {"modelscope": ([4, 12], [1, 4]), "wan": ([2, 6], [1])}
OPTIONS_ARGS = {"modelscope": [], "wan": ["--steps", "10"]}  # see the options part above
PARTS = ("options", "plain", "reelfarm")
# --quick: render settings (ModelScope 8 frames, Wan 5), reelfarm video counts, plain loop videos.
QUICK_RENDER = {"height": 64, "width": 64, "num_inference_steps": 16}
QUICK_SIZES, QUICK_PLAIN = [1, 17], 4


# --- FLOPs, counted on the meta device ------------------------------------------------------

def count_flops(kind: str, render: dict, batch: int = 1) -> dict:
    """FLOPs of one video: text encoding, every denoiser call (with CFG: 2 per step), decode."""
    import torch

    with torch.device("meta"):
        parts = modules(kind)
    frames, height, width, steps = (render["num_frames"], render["height"], render["width"],
                                    render["num_inference_steps"])
    cfg_batch = 2 * batch
    out = {}
    with torch.device("meta"), torch.no_grad():
        if kind == "modelscope":
            tokens = torch.zeros(cfg_batch, 77, dtype=torch.long)
            latents = torch.zeros(cfg_batch, 4, frames, height // 8, width // 8)
            context = torch.zeros(cfg_batch, 77, 1024)
            out["text"] = _flops(lambda: parts["text"](tokens))
            out["denoise_step"] = _flops(lambda: parts["unet"](latents, torch.tensor(500), context))
            # The pipeline decodes frame by frame as images.
            z = torch.zeros(batch * frames, 4, height // 8, width // 8)
            out["decode"] = _flops(lambda: parts["vae"].decode(z))
        else:
            tokens = torch.zeros(cfg_batch, 512, dtype=torch.long)
            t_frames = (frames - 1) // 4 + 1
            latents = torch.zeros(cfg_batch, 16, t_frames, height // 8, width // 8)
            context = torch.zeros(cfg_batch, 512, 4096)
            out["text"] = _flops(lambda: parts["text"](tokens))
            out["denoise_step"] = _flops(lambda: parts["transformer"](
                latents, torch.tensor([500] * cfg_batch), context))
            z = torch.zeros(batch, 16, t_frames, height // 8, width // 8)
            out["decode"] = _flops(lambda: parts["vae"].decode(z))
    out["per_video"] = (out["text"] + steps * out["denoise_step"] + out["decode"]) / batch
    return out


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_flops(device: str, dtype, n: int = 8192, iters: int = 50) -> float:
    """Measured dense fp16 matmul FLOP/s: the ceiling achieved FLOP/s is compared with."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - started)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class GpuSampler:
    """Samples nvidia-smi's utilization.gpu (percent of time a kernel ran) in the background."""

    def __init__(self, interval_ms: int = 200):
        self.samples: list[float] = []
        self._proc = self._thread = None
        self._interval_ms = interval_ms

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            # nvidia-smi numbers GPUs physically; the first visible one is the one used here.
            gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"--loop-ms={self._interval_ms}", f"--id={gpu}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()) / 100.0)
            except ValueError:  # "[N/A]", "[Not Supported]"
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)

    @property
    def busy(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


# --- the two contenders ---------------------------------------------------------------------

def plain_loop(model_dir: str, render: dict, videos: int, out: str, device: str, dtype) -> dict:
    """The hand-written loop: load with from_pretrained, render one video at a time, encode
    with ffmpeg, write."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from rendering.encode import encode_video, to_uint8
    from rendering.contract import EncodeSpec

    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(out, exist_ok=True)
    spec = EncodeSpec()  # reelfarm's defaults: crf 18, preset medium

    def one(i: int) -> None:
        with torch.inference_mode():
            frames = pipe(prompt=f"a test scene, take {i}", output_type="np",
                          generator=torch.Generator("cpu").manual_seed(i), **render).frames[0]
        if not np.isfinite(frames).all():
            raise RuntimeError(f"non-finite frames from {model_dir} in {dtype}")
        encode_video(to_uint8(frames), os.path.join(out, f"{i}.mp4"), 8, spec)

    one(videos)  # warm-up: kernels, allocator, cudnn autotuning
    _sync(device)
    with GpuSampler() as sampler:
        started = time.perf_counter()
        for i in range(videos):
            one(i)
        _sync(device)
        seconds = time.perf_counter() - started
    return {"date": _now(), "videos": videos, "seconds": round(seconds, 2),
            "videos_per_hour": round(videos / seconds * 3600, 1), "gpu_busy": sampler.busy}


def reelfarm_runs(kind: str, model_dir: str, render: dict, sizes: list[int], batch_size: int,
                  root: str, dtype: str, settings: list[str], address: str | None = None) -> dict:
    """``reelfarm render`` as a whole process at two sizes: steady rate and start-up.

    GPU busy of the steady part = (busy seconds of the large run - of the small one) / (wall
    time difference), so that start-up (Ray, loading, compiling) does not dilute it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    walls, busy = {}, {}
    for n in sizes:
        prompts = os.path.join(root, f"prompts-{n}.parquet")
        pq.write_table(pa.table({"id": [f"v{i:05d}" for i in range(n)],
                                 "prompt": [f"a test scene, take {i}" for i in range(n)]}), prompts)
        out = os.path.join(root, f"reelfarm-{kind}-{n}-b{batch_size}")
        shutil.rmtree(out, ignore_errors=True)
        sets = [f"model.path={model_dir}", f"model.dtype={dtype}", f"render.batch_size={batch_size}",
                "output.shard_size=8", "cluster.num_workers=1", *settings]
        sets += [f"render.{k}={v}" for k, v in render.items()]
        argv = [python(), "-m", "jobs.cli", "render", "configs/demo.yaml", "--input", prompts,
                "--output", out, "--quiet"] + [a for s in sets for a in ("--set", s)]
        argv += ["--address", address] if address else []
        with GpuSampler() as sampler:
            proc = run_process(argv, timeout_s=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"reelfarm render failed: {proc.output[-2000:]}")
        walls[n], busy[n] = proc.wall_s, sampler.busy
    small, large = min(sizes), max(sizes)
    result = {"date": _now(), "batch_size": batch_size, "settings": settings,
              "wall_s": {n: round(w, 1) for n, w in walls.items()},
              "videos_per_hour": float("nan"), "startup_s": None, "gpu_busy_steady": None}
    steady = steady_rate(small, large, walls[small], walls[large])
    if steady is None:  # too few videos to tell (e.g. --quick on a busy CPU)
        return result
    result.update(videos_per_hour=round(steady[0] * 3600, 1), startup_s=round(steady[1], 1))
    if busy[small] is not None and busy[large] is not None:
        busy_s = busy[large] * walls[large] - busy[small] * walls[small]
        result["gpu_busy_steady"] = round(busy_s / (walls[large] - walls[small]), 3)
    return result


def best_settings(kind: str, device: str, quick: bool) -> tuple[list[str], str | None]:
    """``--set`` overrides from the options part's fastest lossless variant, and its JSON."""
    path = os.path.join(OUT, options.result_name(device, kind, quick) + ".json")
    if not os.path.exists(path):
        return [], None
    with open(path) as f:
        best = options.fastest_exact(json.load(f))
    return [f"optimize.{k}={v}" for k, v in best.items()], path


def run(kind: str, parts: list[str], sizes: list[int], batch_sizes: list[int], quick: bool) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not quick:
        raise SystemExit("no CUDA device: run this on a GPU machine, or use --quick to check it")
    dtype = torch.float16 if device == "cuda" else torch.float32
    root = os.path.join(OUT, "gpu" + ("_quick" if quick else ""))
    os.makedirs(root, exist_ok=True)
    name = f"gpu_{kind}" + ("_quick" if quick else "")
    entry = _previous(name)  # the parts an earlier command measured
    entry.update(machine=machine(), gpu=torch.cuda.get_device_name(0) if device == "cuda" else None)
    render = dict(SPECS[kind]["render"])
    if quick:
        render.update(num_frames=8 if kind == "modelscope" else 5, **QUICK_RENDER)
    model_dir = ensure_model(kind, quick)
    if "options" in parts:
        argv = [python(), "-m", "bench.options", "--device", device, "--models", kind]
        argv += ["--quick"] if quick else OPTIONS_ARGS[kind]
        code = subprocess.run(argv, cwd=REPO).returncode
        entry["options"] = {"date": _now(), "returncode": code, "json": os.path.join(
            OUT, options.result_name(device, kind, quick) + ".json")}
        save(name, entry)
    if "plain" not in parts and "reelfarm" not in parts:
        return entry
    flops = count_flops(kind, render)
    entry.update(render=render, flops_per_video=flops["per_video"],
                 flops_parts={k: v for k, v in flops.items() if k != "per_video"})
    if device == "cuda":
        entry["matmul_peak_tflops_fp16"] = round(matmul_peak_flops(device, dtype) / 1e12, 1)
    print(kind, "TFLOPs per video:", round(flops["per_video"] / 1e12, 2), flush=True)
    if "plain" in parts:
        entry["plain_loop"] = plain_loop(model_dir, render, QUICK_PLAIN if quick else max(sizes),
                                         os.path.join(root, f"plain-{kind}"), device, dtype)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the reelfarm worker needs the memory
        print(kind, "plain loop:", entry["plain_loop"], flush=True)
        save(name, entry)
    if "reelfarm" in parts:
        settings, source = best_settings(kind, device, quick)
        print(kind, "reelfarm settings:", settings or "defaults", "from", source, flush=True)
        entry["reelfarm"] = []
        with _quick_cluster(quick) as address:
            for batch_size in batch_sizes:
                entry["reelfarm"].append(reelfarm_runs(
                    kind, model_dir, render, sizes, batch_size, root,
                    "float16" if device == "cuda" else "float32", settings, address))
                print(kind, "reelfarm:", entry["reelfarm"][-1], flush=True)
                save(name, entry)
    if "plain_loop" in entry and entry.get("reelfarm"):
        _compare(entry)
    return entry


@contextlib.contextmanager
def _quick_cluster(quick: bool):
    """--quick: the address of a local CPU Ray cluster the reelfarm runs join; else None."""
    if not quick:
        yield None
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": os.cpu_count(), "num_gpus": 0,
                                      "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def _compare(entry: dict) -> None:
    """reelfarm's best run against the plain loop, and both against the matmul peak."""
    plain = entry["plain_loop"]
    best = max(entry["reelfarm"], key=lambda r: -1 if math.isnan(r["videos_per_hour"])
               else r["videos_per_hour"])
    entry["reelfarm_best"] = best
    entry["reelfarm_vs_plain"] = round(best["videos_per_hour"] / plain["videos_per_hour"], 3)
    for name, rate in (("plain_loop", plain["videos_per_hour"]),
                       ("reelfarm_best", best["videos_per_hour"])):
        achieved = entry["flops_per_video"] * rate / 3600
        entry[f"{name}_achieved_tflops"] = round(achieved / 1e12, 2)
        if "matmul_peak_tflops_fp16" in entry:
            entry[f"{name}_fraction_of_peak"] = round(
                achieved / 1e12 / entry["matmul_peak_tflops_fp16"], 3)


def _previous(name: str) -> dict:
    try:
        with open(os.path.join(OUT, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes, CPU allowed: checks the code paths only")
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=None,
                        help="default: both (--quick: modelscope)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--videos", type=int, nargs=2, default=None,
                        help="video counts of the two reelfarm runs (default per model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    models = args.models or (["modelscope"] if args.quick else list(SPECS))
    for kind in models:
        sizes, batch_sizes = (QUICK_SIZES, [1]) if args.quick else RUNS[kind]
        entry = run(kind, args.parts, args.videos or sizes, args.batch_sizes or batch_sizes,
                    args.quick)
        print(json.dumps({k: v for k, v in entry.items() if k != "machine"}, indent=2, default=str))
        print("saved", save(f"gpu_{kind}" + ("_quick" if args.quick else ""), entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
