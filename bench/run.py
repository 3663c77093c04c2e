"""``make bench``: run every benchmark this machine can run, then print where results are.

    python -m bench.run            # full: plan scale, driver throughput, bookkeeping at
                                   # 100k rows, the report over 1M scored rows, CPU side by side,
                                   # multi-stage jobs, the text stage, products, elastic
                                   # capacity, metrics'
                                   # series, GPU if any, options on the CPU
    python -m bench.run --quick    # each benchmark's --quick mode (a smoke run)

Raw results land in bench/out/*.json (git-ignored); bench/RESULTS.md is written by hand from
them, with the machine, date and commit they came from.
"""

from __future__ import annotations

import argparse
import sys

from bench import (bookkeeping, cpu_side_by_side, driver_throughput, elastic, gpu, metrics,
                   options, plan_scale, products, report_scores, stages, text_stage)


# In the order they run. The options on the CPU's tiny models come last (on a GPU the gpu step
# measures them at full size): they set this process's torch threads.
STEPS = {"plan": plan_scale.main, "driver": driver_throughput.main,
         "bookkeeping": bookkeeping.main, "report": report_scores.main,
         "cpu": cpu_side_by_side.main,
         "stages": stages.main, "text": text_stage.main, "products": products.main,
         "elastic": elastic.main,
         "metrics": metrics.main,
         "gpu": gpu.main, "options": lambda flags: options.main(flags + ["--device", "cpu"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    failed = []
    for name, step in STEPS.items():
        if name not in args.only:
            continue
        if name == "gpu" and not _has_cuda() and not args.quick:
            print("gpu: skipped, no CUDA device here (run `python -m bench.gpu` on a GPU machine)")
            continue
        print(f"=== {name} ===", flush=True)
        try:
            if step(flags) != 0:
                failed.append(name)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark should not hide the rest
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            failed.append(name)
    print("results: bench/out/*.json; summary: bench/RESULTS.md")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
