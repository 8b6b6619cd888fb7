"""Benchmark: explanations per second (CAM, Grad-CAM, saliency) at 224² and 1024², vs plain inference.

One explanation = one (image, label) heat map from ``cxr.tools.explain.heat_maps``;
plain inference = one ``torch.inference_mode`` forward of the same batch (all 14
labels). Random-init DenseNet-121 (the CheXNet model; weights do not change the
cost), grey input, batch 1 by default, CPU, torch threads as given. Each timing is
the median of ``--repeats`` calls after one warm-up call.

    .venv/bin/python bench/explain.py [--model densenet121] [--sizes 224,1024] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.models import build_model  # noqa: E402
from cxr.tools.explain import METHODS, heat_maps  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall s, process CPU s) of fn() over ``repeats`` calls, after one warm-up.

    CPU seconds are less distorted than wall time when other jobs share the cores.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet121")
    p.add_argument("--sizes", default="224,1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 14).eval()
    print(
        f"{args.model}, batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}; median of {args.repeats} after a warm-up; "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at start"
    )
    print("| size | method | wall s | explanations/s (wall) | CPU s | cost vs inference (wall / CPU) |")
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        image = torch.randn(args.batch, 1, size, size)

        def infer():
            with torch.inference_mode():
                model(image)

        base, base_cpu = timed(infer, args.repeats)
        print(
            f"| {size} | inference (14 labels) | {base:.3f} | {args.batch / base:.2f} images/s | {base_cpu:.3f} "
            f"| 1.00× / 1.00× |",
            flush=True,
        )
        for method in METHODS:
            if method == "cam" and model.classifier_weight is None:
                continue
            t, c = timed(lambda: heat_maps(method, model, image, [1]), args.repeats)
            print(
                f"| {size} | {method} (1 label) | {t:.3f} | {args.batch / t:.2f} | {c:.3f} | "
                f"{t / base:.2f}× / {c / base_cpu:.2f}× |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
