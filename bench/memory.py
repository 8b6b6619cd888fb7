"""Peak memory and step time of densenet121 fwd+bwd at 1024², with and without activation checkpointing.

Each configuration (batch × checkpointing) runs in its own subprocess, so the
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process high-water
mark) belongs to that configuration alone. Configurations are interleaved over
``--repeats`` rounds so a change in machine load hits all of them alike;
medians are reported, then the ratios checkpointed / plain at each batch size
(goal: ≤ 0.5× peak memory at ≤ 1.4× step time). On a shared machine wall time
swings with other load, so the CPU time of the step (``time.process_time``,
all threads) is reported beside it: it counts the work, not the waiting.

    python bench/memory.py                       # batch 1 and 2, 3 steps, 2 rounds
    python bench/memory.py --results bench/RESULTS.md

The "activations" column is peak RSS minus the RSS after building the model
(before the first step): the memory checkpointing acts on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## memory"
MODES = (0, 1, 2)  # plain, cxr grad_checkpointing, timm memory-efficient (densenet only)
MODE_NAMES = {0: "no", 1: "yes (cxr)", 2: "timm memory-efficient"}


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One configuration: build, run ``steps`` fwd+bwd steps, print one JSON line."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from cxr.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, grad_checkpointing=args.ckpt == 1).train()
    if args.ckpt == 2:  # timm's memory-efficient DenseNet: only each layer's bottleneck recomputed
        model.trunk.backbone.set_grad_checkpointing(True)
    image = torch.randn(args.batch, 1, args.size, args.size)
    target = torch.randint(0, 2, (args.batch, 14)).float()
    built = rss_mib()
    times, cpu = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(image), target).backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    # The first step also pays allocator growth and one-time setup.
    skip = 1 if len(times) > 1 else 0
    print(
        json.dumps(
            {
                "batch": args.batch,
                "ckpt": args.ckpt,
                "built_mib": built,
                "peak_mib": rss_mib(),
                "step_s": statistics.median(times[skip:]),
                "cpu_s": statistics.median(cpu[skip:]),
                "times": times,
                "cpu": cpu,
            }
        )
    )


def run_one(args: argparse.Namespace, batch: int, ckpt: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--batch",
        str(batch),
        "--ckpt",
        str(ckpt),
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
        "--model",
        args.model,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[tuple[int, int], list[dict]]:
    """Every (batch, ckpt) configuration ``repeats`` times, interleaved."""
    from cxrbase.progress import progress

    configs = [(b, c) for b in args.batches for c in MODES[: 3 if args.timm_variant else 2]]
    results: dict[tuple[int, int], list[dict]] = {cfg: [] for cfg in configs}
    with progress(total=len(configs) * args.repeats, desc="configurations", unit="run") as bar:
        for _ in range(args.repeats):
            for batch, ckpt in configs:
                results[(batch, ckpt)].append(run_one(args, batch, ckpt))
                bar.update()
    return results


def report(args: argparse.Namespace, results: dict[tuple[int, int], list[dict]], seconds: float) -> str:
    """A markdown table of medians and the ratios checkpointed / plain."""
    keys = ("built_mib", "peak_mib", "step_s", "cpu_s")
    med = {cfg: {k: statistics.median(r[k] for r in runs) for k in keys} for cfg, runs in results.items()}
    lines = [
        "| batch | checkpointing | peak RSS MiB | activations MiB | step s (wall) | step CPU s | peak ratio "
        "| activ. ratio | wall-time ratio | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        plain = med[(batch, 0)]
        for ckpt in sorted(c for b, c in med if b == batch):
            m = med[(batch, ckpt)]
            act, act0 = m["peak_mib"] - m["built_mib"], plain["peak_mib"] - plain["built_mib"]
            ratios = (
                f"{m['peak_mib'] / plain['peak_mib']:.2f}× | {act / act0:.2f}× | "
                f"{m['step_s'] / plain['step_s']:.2f}× | {m['cpu_s'] / plain['cpu_s']:.2f}×"
            )
            lines.append(
                f"| {batch} | {MODE_NAMES[ckpt]} | {m['peak_mib']:.0f} | {act:.0f} | "
                f"{m['step_s']:.2f} | {m['cpu_s']:.2f} | {ratios} |"
            )
    lines.append(
        f"\n{args.model} fwd+bwd at {args.size}², {args.threads} thread(s), median of {args.repeats} "
        f"round(s) × {args.steps - 1} steady step(s); {len(results) * args.repeats} subprocesses in "
        f"{seconds:.0f} s. Goal: peak ratio ≤ 0.5× at time ratio ≤ 1.4×."
    )
    return "\n".join(lines)


def append_results(path: Path, command: str, table: str) -> None:
    """Append this run under the "memory" section of RESULTS.md (re-read just before writing)."""
    sys.path.insert(0, str(ROOT))
    from cxrbase.atomic import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmark results\n"
    entry = f"\n`{command}` ({time.strftime('%Y-%m-%d %H:%M')})\n\n{table}\n"
    if SECTION in text:
        start = text.index(SECTION) + len(SECTION)
        nxt = text.find("\n## ", start)
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n" + entry + text[end:]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n" + entry
    atomic_write_text(path, text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes to measure (default 1 2)")
    p.add_argument("--steps", type=int, default=3, help="fwd+bwd steps per run; the first is not timed (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all configurations (default 2)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every run (default 2)")
    p.add_argument("--model", default="densenet121", help="model name of cxr.models (default densenet121)")
    p.add_argument(
        "--timm-variant",
        action="store_true",
        help="also measure timm's memory-efficient DenseNet (bottleneck-only recompute) for comparison",
    )
    p.add_argument("--results", type=Path, help="append the table and command to this RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    start = time.perf_counter()
    results = measure(args)
    table = report(args, results, time.perf_counter() - start)
    print(table)
    if args.results:
        command = "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(args.results, command.strip(), table)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
