"""GPU benchmark (needs a CUDA machine; NOT measured yet, see RESULTS.md).

Full-size random-weight models built from the published configs, with no network:
  - ModelScope text-to-video 1.7B (UNet3D + OpenCLIP-H text encoder + SD VAE), 16x256x256
  - Wan 2.1 T2V 1.3B (DiT + UMT5-XXL text encoder + Wan VAE), 33x480x832
For each: per-GPU videos/hour of a plain diffusers loop in fp16 (load once, render, encode
with ffmpeg, write) and of ``reelfarm render`` with its best settings (fp16, one worker per
GPU, batch_size swept); GPU busy fraction (nvidia-smi samples); achieved FLOP/s against a
measured fp16 matmul peak, with FLOPs counted by torch.utils.flop_counter on the meta device.

    python -m bench.gpu                     # on a GPU machine: both models, ~20 min
    python -m bench.gpu --models modelscope --videos 4 12
    python -m bench.gpu --quick             # anywhere: tiny models on CPU, checks the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from bench.common import OUT, machine, python, run_process, save

# Published architectures (diffusers configs of ali-vilab/text-to-video-ms-1.7b and
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers), written out so that no hub access is needed.
MODELSCOPE = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=64, norm_num_groups=32),
    "text": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                 num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
                 hidden_act="gelu", max_position_embeddings=77),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), sample_size=256,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    "render": dict(num_frames=16, height=256, width=256, num_inference_steps=25, guidance_scale=9.0),
}
WAN_1_3B = {
    "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                        ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "text": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                 num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                 pad_token_id=0, eos_token_id=1),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True]),
    "render": dict(num_frames=33, height=480, width=832, num_inference_steps=30, guidance_scale=5.0),
}
SPECS = {"modelscope": MODELSCOPE, "wan": WAN_1_3B}


# --- building full-size random-weight pipelines ---------------------------------------------

def build_pipeline(kind: str, device: str, dtype):
    """A pipeline of the published size with random weights, made on ``device`` directly."""
    import torch

    from rendering import tiny

    with torch.device("meta"):
        parts = _modules(kind)
    for name, module in parts.items():
        module.to_empty(device=device)
        _randomize(module)
        parts[name] = module.to(dtype=dtype).eval()
    if kind == "modelscope":
        from diffusers import DDIMScheduler, TextToVideoSDPipeline

        return TextToVideoSDPipeline(
            vae=parts["vae"], text_encoder=parts["text"], unet=parts["unet"],
            tokenizer=tiny._clip_tokenizer(),  # a small vocabulary; ids are all the model sees
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False))
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer

    import string
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in string.ascii_lowercase]
    pieces += [(ch, -2.0) for ch in string.ascii_lowercase + string.digits]
    return WanPipeline(tokenizer=T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512),
                       text_encoder=parts["text"], vae=parts["vae"], transformer=parts["transformer"],
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _modules(kind: str) -> dict:
    spec = SPECS[kind]
    if kind == "modelscope":
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        return {"unet": UNet3DConditionModel(**spec["unet"]),
                "text": CLIPTextModel(CLIPTextConfig(**spec["text"])),
                "vae": AutoencoderKL(**spec["vae"])}
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return {"transformer": WanTransformer3DModel(**spec["transformer"]),
            "text": UMT5EncoderModel(UMT5Config(**spec["text"])),
            "vae": AutoencoderKLWan(**spec["vae"])}


def _randomize(module) -> None:
    """Small random weights (unit norms, zero biases): finite activations through every layer."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()


# --- FLOPs, counted on the meta device ------------------------------------------------------

def count_flops(kind: str, render: dict, batch: int = 1) -> dict:
    """FLOPs of one video: text encoding, every denoiser call (with CFG: 2 per step), decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        parts = _modules(kind)
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
        self._proc = None
        self._interval_ms = interval_ms

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self._interval_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()) / 100.0)
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def busy(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


# --- the two contenders ---------------------------------------------------------------------

def plain_loop(pipe, render: dict, videos: int, out: str, device: str) -> dict:
    """The hand-written loop: render one video at a time in fp16, encode with ffmpeg, write."""
    import torch

    from rendering.encode import encode_video, to_uint8
    from rendering.specs import EncodeSpec

    os.makedirs(out, exist_ok=True)
    spec = EncodeSpec(crf=18, preset="medium")

    def one(i: int) -> None:
        with torch.inference_mode():
            frames = pipe(prompt=f"a test scene, take {i}", output_type="np",
                          generator=torch.Generator("cpu").manual_seed(i), **render).frames[0]
        encode_video(to_uint8(frames), os.path.join(out, f"{i}.mp4"), 8, spec)

    one(-1)  # warm-up: kernels, allocator, cudnn autotuning
    _sync(device)
    with GpuSampler() as sampler:
        started = time.perf_counter()
        for i in range(videos):
            one(i)
        _sync(device)
        seconds = time.perf_counter() - started
    return {"videos": videos, "seconds": round(seconds, 2),
            "videos_per_hour": round(videos / seconds * 3600, 1), "gpu_busy": sampler.busy}


def reelfarm_runs(kind: str, model_dir: str, render: dict, sizes: list[int], batch_size: int,
                  root: str, dtype: str) -> dict:
    """``reelfarm render`` as a whole process at two sizes: steady rate and start-up."""
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
                "output.shard_size=8", "cluster.num_workers=1"]
        sets += [f"render.{k}={v}" for k, v in render.items()]
        argv = [python(), "-m", "jobs.cli", "render", "configs/demo.yaml", "--input", prompts,
                "--output", out, "--quiet"] + [a for s in sets for a in ("--set", s)]
        with GpuSampler() as sampler:
            proc = run_process(argv, timeout_s=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"reelfarm render failed: {proc.output[-2000:]}")
        walls[n], busy[n] = proc.wall_s, sampler.busy
    small, large = min(sizes), max(sizes)
    if walls[large] <= walls[small]:  # too few videos to tell (e.g. --quick on a busy CPU)
        return {"batch_size": batch_size, "wall_s": walls, "videos_per_hour": float("nan"),
                "startup_s": None, "gpu_busy": busy[large]}
    rate = (large - small) / (walls[large] - walls[small])
    return {"batch_size": batch_size, "wall_s": {n: round(w, 1) for n, w in walls.items()},
            "videos_per_hour": round(rate * 3600, 1),
            "startup_s": round(walls[small] - small / rate, 1), "gpu_busy": busy[large]}


def run(models: list[str], sizes: list[int], batch_sizes: list[int], quick: bool) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not quick:
        raise SystemExit("no CUDA device: run this on a GPU machine, or use --quick to check it")
    dtype = torch.float16 if device == "cuda" else torch.float32
    root = os.path.join(OUT, "gpu" + ("_quick" if quick else ""))
    os.makedirs(root, exist_ok=True)
    result = {"machine": machine(), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "models": {}}
    if device == "cuda":
        result["matmul_peak_tflops_fp16"] = round(matmul_peak_flops(device, dtype) / 1e12, 1)
    for kind in models:
        render = dict(SPECS[kind]["render"])
        if quick:
            render.update(num_frames=8 if kind == "modelscope" else 5, height=32, width=32,
                          num_inference_steps=2)
        flops = count_flops(kind, render)
        entry = {"render": render, "flops_per_video": flops["per_video"],
                 "flops_parts": {k: v for k, v in flops.items() if k != "per_video"}}
        print(kind, "TFLOPs per video:", round(flops["per_video"] / 1e12, 2), flush=True)
        if quick:
            from rendering.tiny import build_tiny_pipeline

            pipe, model_dir = build_tiny_pipeline(kind), f"tiny:{kind}"
        else:
            pipe = build_pipeline(kind, device, dtype)
            model_dir = os.path.join(root, f"{kind}-random")
            if not os.path.exists(os.path.join(model_dir, "model_index.json")):
                pipe.save_pretrained(model_dir, safe_serialization=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        plain = plain_loop(pipe, render, max(sizes) if not quick else 2,
                           os.path.join(root, f"plain-{kind}"), device)
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
        entry["plain_loop"] = plain
        print(kind, "plain loop:", plain, flush=True)
        entry["reelfarm"] = []
        for batch_size in batch_sizes:
            rf = reelfarm_runs(kind, model_dir, render, sizes, batch_size, root,
                               "float16" if device == "cuda" else "float32")
            entry["reelfarm"].append(rf)
            print(kind, "reelfarm:", rf, flush=True)
        best = max(entry["reelfarm"], key=lambda r: r["videos_per_hour"]
                   if r["videos_per_hour"] == r["videos_per_hour"] else -1)
        entry["reelfarm_best"] = best
        entry["reelfarm_vs_plain"] = round(best["videos_per_hour"] / plain["videos_per_hour"], 3)
        for name, rate in (("plain_loop", plain["videos_per_hour"]),
                           ("reelfarm_best", best["videos_per_hour"])):
            achieved = flops["per_video"] * rate / 3600
            entry[f"{name}_achieved_tflops"] = round(achieved / 1e12, 2)
            if "matmul_peak_tflops_fp16" in result:
                entry[f"{name}_fraction_of_peak"] = round(
                    achieved / 1e12 / result["matmul_peak_tflops_fp16"], 3)
        result["models"][kind] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes, CPU allowed: checks the code paths only")
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--videos", type=int, nargs=2, default=None, help="small and large counts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    sizes = args.videos or ([2, 4] if args.quick else [4, 16])
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 2, 4])
    models = args.models if not args.quick or args.models != list(SPECS) else ["modelscope"]
    result = run(models, sizes, batch_sizes, args.quick)
    print(json.dumps(result["models"], indent=2, default=str))
    print("saved", save("gpu" + ("_quick" if args.quick else ""), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
