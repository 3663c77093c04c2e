"""The measured effect of each ``optimize.*`` option, of the dtype and of the batch size.

Each variant is a pipeline loaded as a worker loads it (load_pipeline with a ModelSpec and an
OptimizeSpec) and rendered with render_batch, same prompts and seeds. Per variant: seconds per
video (median over rounds), its ratio to the baseline in the same round, the first call apart
(warm-up, or compilation), how far its frames are from the baseline's (mean and max absolute
difference in [0, 1] pixels), FirstBlockCache's skipped block calls, and on CUDA peak memory.
Random weights make FirstBlockCache's skips meaningless: its figures check the mechanism only.

On the CPU the tiny pipelines stay loaded and rounds interleave them. On CUDA the full-size
models (bench/full_size_models.py) load one at a time (Wan takes about 14 GB); no variant starts
once the time budget is spent, and results are saved after each one.

    python -m bench.options                    # CPU: tiny:modelscope and tiny:wan, 7 rounds
    python -m bench.options --device cuda --models wan [--variants ...] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from bench.common import machine, median, save
from rendering.contract import ModelSpec, OptimizeSpec, Task

MODELS = ("modelscope", "wan")
# Attention backends of diffusers' dispatcher (diffusers.models.attention_dispatch), by device.
# The *_hub backends are left out: they download kernels from the hub.
CUDA_ATTENTION = ("_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3",
                  "sage", "xformers")
CPU_ATTENTION = ("_native_math", "_native_flash", "flex")
QUICK_VARIANTS = ("baseline", "vae_slicing", "batch=2", "fbc=0.1")


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str | None = None  # None: the baseline's (float16 on CUDA, float32 on the CPU)
    optimize: OptimizeSpec = OptimizeSpec()
    batch_size: int = 1
    exact: bool = True  # computes what the baseline computes, up to floating-point rounding


def catalog(device: str) -> tuple[list[Variant], dict[str, str]]:
    """Every variant, in the order a time-limited run measures them, and those that cannot be
    measured on ``device``, with the reason."""
    attention = CUDA_ATTENTION if device == "cuda" else CPU_ATTENTION
    fbc = lambda t: Variant(f"fbc={t}", optimize=OptimizeSpec(first_block_cache_threshold=t),
                            exact=False)
    offload = [Variant(f"offload={m}", optimize=OptimizeSpec(offload=m))
               for m in ("model", "sequential")]
    variants = [Variant("baseline"), Variant("bfloat16", "bfloat16", exact=False)]
    variants += [Variant(f"attention={b}", optimize=OptimizeSpec(attention_backend=b))
                 for b in attention]
    variants += [Variant(f"compile={c}", optimize=OptimizeSpec(compile=c))
                 for c in ("repeated_blocks", "full")]
    variants += [fbc(0.1), Variant("vae_slicing", optimize=OptimizeSpec(vae_slicing=True)),
                 Variant("vae_tiling", optimize=OptimizeSpec(vae_tiling=True), exact=False),
                 Variant("batch=2", batch_size=2), Variant("batch=4", batch_size=4)]
    variants += [offload[0], fbc(0.05), fbc(0.2), offload[1]]
    if device == "cuda":
        return variants, {}
    skipped = {v.name: "offload moves weights between the CPU and a GPU: nothing to measure "
                       "without a GPU" for v in offload}
    skipped.update({f"attention={b}": "needs CUDA" for b in CUDA_ATTENTION
                    if b not in CPU_ATTENTION})
    return [v for v in variants if v.name not in skipped], skipped


def workload(kind: str, device: str, quick: bool, steps: int | None) -> tuple[str, dict]:
    """The model path and render settings: the tiny model with configs/demo.yaml's settings
    on the CPU (Wan takes 4k+1 frames), the full-size random-weight model on CUDA."""
    if device == "cuda" and not quick:
        from bench.full_size_models import SPECS, ensure_model

        path, render = ensure_model(kind), dict(SPECS[kind]["render"])
    else:
        from bench.cpu_side_by_side import QUICK_OVERRIDES, workload as demo

        r = demo(QUICK_OVERRIDES if quick else []).render
        path = f"tiny:{kind}"
        render = dict(num_frames=r.num_frames, height=r.height, width=r.width,
                      num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale)
        if kind == "wan":
            render["num_frames"] += 1 - render["num_frames"] % 4
    if steps:
        render["num_inference_steps"] = steps
    return path, render


def probe_attention(backend: str, device: str, dtype: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` (a missing package, no kernel), or None."""
    import torch
    from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn

    from rendering.pipelines.load import DTYPES

    q = torch.randn(1, 64, 2, 64, device=device, dtype=DTYPES[dtype])
    try:
        with attention_backend(backend):
            dispatch_attention_fn(q, q, q)
    except Exception as exc:  # noqa: BLE001 - any failure means: not on this machine
        return _error(exc)
    return None


# --- measuring --------------------------------------------------------------------------------

class _Run:
    """One model's variants: load, warm up, time rounds, compare frames with the baseline."""

    def __init__(self, device: str, path: str, render: dict, videos: int,
                 variants: list[Variant], skipped: dict, rounds: int, name: str):
        import torch

        self.device, self.path, self.render, self.videos = device, path, render, videos
        self.base_dtype = "float16" if device == "cuda" else "float32"
        self.variants = {v.name: v for v in variants}
        self.reference = None  # the baseline's frames, from its first timed round
        self.pipes: dict[tuple, object] = {}  # loaded pipelines by key()
        self.name = name
        self.result = {
            "machine": machine(), "device": device, "gpu": _gpu_name(device), "model": path,
            "render": render, "torch_threads": torch.get_num_threads(), "rounds": rounds,
            "videos_per_round": videos, "interleaved": device != "cuda",
            "variants": {v.name: {"dtype": v.dtype or self.base_dtype, "batch_size": v.batch_size,
                                  "optimize": _changed(v.optimize), "exact": v.exact,
                                  "status": "pending", "s_per_video_rounds": []}
                         for v in variants},
            "not_measurable": skipped}

    def tasks(self, batch_size: int) -> list[Task]:
        """``videos`` rows (rounded up to whole batches), seeds 0, 1, ...: the same for all."""
        n = math.ceil(self.videos / batch_size) * batch_size
        params = {"negative_prompt": None, "fps": 8, "strength": None, **self.render}
        return [Task(id=f"v{i}", key=f"v{i}", seed=i, prompt=f"a test scene, take {i}",
                     params=params) for i in range(n)]

    def key(self, name: str) -> tuple:
        """What a loaded pipeline depends on: variants that differ only in batch size share it."""
        v = self.variants[name]
        return (v.dtype or self.base_dtype, v.optimize)

    def start(self, name: str) -> bool:
        """Load the variant's pipeline (unless one with the same key is loaded) and make its
        first call: warm-up, and compilation for ``compile``."""
        from rendering.pipelines.load import load_pipeline

        v, entry, key = self.variants[name], self.result["variants"][name], self.key(name)
        if key not in self.pipes:
            try:
                started = time.perf_counter()
                pipe = load_pipeline(ModelSpec(self.path, dtype=v.dtype or self.base_dtype),
                                     self.device, v.optimize)  # as a worker loads it
                entry["load_s"] = round(time.perf_counter() - started, 2)
            except ValueError as exc:  # the pipeline refuses an option the model lacks
                return self._drop(name, "skipped", _error(exc))
            except Exception as exc:  # noqa: BLE001 - one failing option must not stop the rest
                return self._drop(name, "failed", _error(exc))
            self.pipes[key] = pipe
        pipe = self.pipes[key]
        counter = _BlockCounter(pipe) if v.optimize.first_block_cache_threshold else None
        try:
            started = time.perf_counter()
            with _attention(v):
                _render(pipe, self.tasks(v.batch_size)[:v.batch_size])
            entry["first_call_s"] = round(time.perf_counter() - started, 2)
        except Exception as exc:  # noqa: BLE001
            return self._drop(name, "failed", _error(exc))
        if counter:
            entry["block_calls"], entry["blocks_run"] = counter.close()
        entry["status"] = "ok"
        return True

    def time_round(self, name: str) -> bool:
        """Render the variant's rows once, timed; compare its frames with the baseline's."""
        v, entry = self.variants[name], self.result["variants"][name]
        tasks = self.tasks(v.batch_size)
        try:
            with _attention(v):
                started = time.perf_counter()
                frames = [_render(self.pipes[self.key(name)], tasks[i:i + v.batch_size])
                          for i in range(0, len(tasks), v.batch_size)]
                seconds = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001
            return self._drop(name, "failed", _error(exc))
        entry["s_per_video_rounds"].append(round(seconds / len(tasks), 4))
        frames = np.concatenate(frames)[:self.videos]
        if name == "baseline" and self.reference is None:
            self.reference = frames
        if self.reference is not None and ("drift_mean" not in entry or name == "baseline"):
            diff = np.abs(frames - self.reference)
            if "drift_mean" not in entry:
                entry["finite"] = bool(np.isfinite(frames).all())
                entry["drift_mean"], entry["drift_max"] = float(diff.mean()), float(diff.max())
            else:  # the baseline against itself: the drift that is run-to-run noise alone
                entry["repeat_drift_max"] = max(entry.get("repeat_drift_max", 0.0),
                                                float(diff.max()))
        return True

    def _drop(self, name: str, status: str, reason: str) -> bool:
        entry = self.result["variants"][name]
        entry["status"], entry["reason"] = status, reason
        print(f"  {name}: {status}: {reason}", flush=True)
        return False

    def summarize(self) -> dict:
        """Medians; the ratio to the baseline pairs each round with the baseline's same round,
        so that a machine slower in one round than in another does not count."""
        variants = self.result["variants"]
        base = variants["baseline"]["s_per_video_rounds"]
        for entry in variants.values():
            entry["s_per_video"] = median(entry["s_per_video_rounds"])
            entry["x_baseline_rounds"] = [round(s / b, 3)
                                          for s, b in zip(entry["s_per_video_rounds"], base)]
            entry["x_baseline"] = round(median(entry["x_baseline_rounds"]), 3)
        print("saved", save(self.name, self.result), flush=True)
        return self.result


def measure_interleaved(run: _Run, rounds: int) -> dict:
    """All pipelines loaded at once; each round times every variant, in a rotated order."""
    names = []
    for name in run.variants:
        print(f"loading {name}", flush=True)
        if run.start(name):
            names.append(name)
    for r in range(rounds if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if run.result["variants"][name]["status"] == "ok":
                run.time_round(name)
        print(f"round {r} done", flush=True)
        run.summarize()
    return run.result


def measure_one_at_a_time(run: _Run, rounds: int, budget_s: float | None) -> dict:
    """One pipeline on the GPU at a time: per variant (those sharing a pipeline one after the
    other), warm up, ``rounds`` timed rounds, peak memory, save."""
    import torch

    first = {}
    for name in run.variants:
        first.setdefault(run.key(name), len(first))
    started = time.monotonic()
    for name in sorted(run.variants, key=lambda n: first[run.key(n)]):
        if run.key(name) not in run.pipes:
            run.pipes.clear()
            gc.collect()
            torch._dynamo.reset()  # compiled graphs hold on to their pipeline's weights
            torch.cuda.empty_cache()
        if budget_s is not None and time.monotonic() - started > budget_s:
            run._drop(name, "skipped", f"not started: the {budget_s:.0f} s budget was spent")
            continue
        print(f"measuring {name}", flush=True)
        torch.cuda.reset_peak_memory_stats()  # the peak starts at what is loaded
        if run.start(name):
            for _ in range(rounds):
                if not run.time_round(name):
                    break
            run.result["variants"][name]["peak_gpu_gib"] = round(
                torch.cuda.max_memory_allocated() / 2**30, 2)
        run.summarize()
    run.pipes.clear()
    return run.summarize()


# --- helpers ----------------------------------------------------------------------------------

def _render(pipe, tasks: list[Task]):
    """One batch through the worker's own call path (adapter included)."""
    from rendering.pipelines import adapter_for
    from rendering.pipelines.load import render_batch

    return render_batch(pipe, adapter_for(pipe), tasks, [{}] * len(tasks))


class _BlockCounter:
    """Counts transformer block calls, and those whose layers ran: FirstBlockCache enters a
    block it skips but none of the block's layers."""

    def __init__(self, pipe):
        from rendering.pipelines.base import denoiser_of

        self.calls = self.ran = 0
        denoiser = denoiser_of(pipe)
        blocks = [m for m in denoiser.modules()
                  if type(m).__name__ in (denoiser._repeated_blocks or ())]
        self.handles = [b.register_forward_pre_hook(self._call) for b in blocks]
        self.handles += [next(b.children()).register_forward_pre_hook(self._run) for b in blocks]

    def _call(self, *_):
        self.calls += 1

    def _run(self, *_):
        self.ran += 1

    def close(self) -> tuple[int, int]:
        for h in self.handles:
            h.remove()
        return self.calls, self.ran


def _attention(v: Variant):
    """The variant's attention backend as the process-wide one while it renders.

    ``set_attention_backend`` also sets the process-wide backend, which processors without
    their own use: without this, loading one variant would change the others' attention.
    """
    from diffusers.models.attention_dispatch import attention_backend
    from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

    return attention_backend(v.optimize.attention_backend or DIFFUSERS_ATTN_BACKEND)


def _changed(opt: OptimizeSpec) -> dict:
    default = OptimizeSpec()
    return {k: v for k, v in dataclasses.asdict(opt).items() if v != getattr(default, k)}


def _error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _gpu_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else None


def result_name(device: str, kind: str, quick: bool) -> str:
    return f"options_{device}_{kind}" + ("_quick" if quick else "")


def fastest_exact(result: dict) -> dict:
    """The ``optimize`` settings of the fastest variant that computes what the baseline does, at
    its dtype and batch size (no FirstBlockCache, VAE tiling or other dtype); {} if none is
    faster than the baseline."""
    variants = result["variants"]
    base = variants["baseline"]
    best, best_s = {}, base["s_per_video"]
    for v in variants.values():
        if (v["status"] == "ok" and v["exact"] and v["dtype"] == base["dtype"]
                and v["batch_size"] == 1 and v["s_per_video"] < best_s):
            best, best_s = v["optimize"], v["s_per_video"]
    return best


def table(result: dict) -> str:
    r = result["render"]
    head = (f"{result['model']} on {result['gpu'] or 'cpu, %d threads' % result['torch_threads']}: "
            f"{r['num_frames']}x{r['height']}x{r['width']}, {r['num_inference_steps']} steps, "
            f"CFG {r['guidance_scale']}; {result['rounds']} rounds of {result['videos_per_round']} "
            f"videos{', interleaved' if result['interleaved'] else ', one variant at a time'}")
    lines = [head, f"{'variant':26s} {'s/video':>8s} {'x base':>7s} {'(rounds)':>11s} "
                   f"{'load s':>7s} {'1st call s':>10s} {'drift mean/max':>15s}  note"]
    for name, v in result["variants"].items():
        if v["status"] != "ok":
            lines.append(f"{name:26s} {v['status']}: {v.get('reason', '')}")
            continue
        drift = (f"{v['drift_mean']:.4f}/{v['drift_max']:.3f}" if "drift_mean" in v else "")
        note = []
        if "block_calls" in v:
            note.append(f"blocks run {v['blocks_run']}/{v['block_calls']}")
        if "peak_gpu_gib" in v:
            note.append(f"peak {v['peak_gpu_gib']} GiB")
        if "repeat_drift_max" in v:
            note.append(f"run-to-run drift max {v['repeat_drift_max']:.3g}")
        if v.get("finite") is False:
            note.append("NON-FINITE FRAMES")
        load = f"{v['load_s']:7.1f}" if "load_s" in v else f"{'shared':>7s}"
        spread = (f"{min(v['x_baseline_rounds']):.2f}-{max(v['x_baseline_rounds']):.2f}"
                  if v["x_baseline_rounds"] else "")
        lines.append(f"{name:26s} {v['s_per_video']:8.3f} {v['x_baseline']:7.2f} {spread:>11s} "
                     f"{load} {v['first_call_s']:10.1f} {drift:>15s}  {', '.join(note)}")
    lines += [f"{name:26s} not measurable: {why}" for name, why in result["not_measurable"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, a few variants")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda where there is one")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=None,
                        help="names from the table (the baseline is always measured)")
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 on the CPU, 2 on CUDA")
    parser.add_argument("--videos", type=int, default=None,
                        help="videos per round (default: 4 on the CPU, 1 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="override the sampler steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="CUDA: start no variant after this long (default 360 per model)")
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # experimental-feature and deprecation notices
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device == "cuda"
    rounds = args.rounds or (1 if args.quick else 2 if cuda else 7)
    videos = args.videos or (1 if cuda else 2 if args.quick else 4)
    budget_s = args.budget_s or (360.0 if cuda and not args.quick else None)
    variants, skipped = catalog(device)
    wanted = args.variants or (QUICK_VARIANTS if args.quick else None)
    if wanted:
        unknown = set(wanted) - {v.name for v in variants} - set(skipped)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from "
                         + ", ".join(v.name for v in variants))
        variants = [v for v in variants if v.name == "baseline" or v.name in wanted]
        skipped = {k: why for k, why in skipped.items() if k in wanted}
    base_dtype = "float16" if cuda else "float32"
    for v in variants:
        if v.optimize.attention_backend:
            why = probe_attention(v.optimize.attention_backend, device, base_dtype)
            if why:
                skipped[v.name] = why
    variants = [v for v in variants if v.name not in skipped]
    # Empty compile caches, as on a fresh node: a first call then takes the whole compilation,
    # not a lookup of what an earlier run compiled.
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        for kind in args.models:
            path, render = workload(kind, device, args.quick, args.steps)
            run = _Run(device, path, render, videos, variants, skipped, rounds,
                       result_name(device, kind, args.quick))
            result = (measure_one_at_a_time(run, rounds, budget_s) if cuda
                      else measure_interleaved(run, rounds))
            print(table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
