"""DDP against DeepSpeed ZeRO-1/2 on two processes: step time and peak memory per process, side by side.

Each row is one `accelerate launch` of this file with a shipped launcher config — DDP through
launch/configs/cpu-2proc.yaml, ZeRO through launch/configs/deepspeed_zero{1,2}.yaml (on a machine
without CUDA training picks gloo for both) — set up as cxr/train.py sets up a run
(``make_accelerator``, ``build_optimizer``, ``configure_deepspeed`` with its sized ZeRO buckets, then
``accelerator.prepare``), training the config's model on random [B,1,R,R] batches. Per rank:
the median time of the timed steps (forward, backward, optimizer step), the peak RSS of the
process (``ru_maxrss``) and its growth over the RSS right after the model was built (what the
wrapper, gradients, buckets and optimizer state add). The modes alternate in every round, so
a load change on the machine spreads over all of them.

    python bench/ddp_vs_zero.py [--models cnn densenet121] [--resolution 64] [--batch 8] [--steps 12]
                                [--rounds 2] [--append bench/RESULTS.md]

On CPU the collectives are gloo over shared memory (DeepSpeed's shm helper): the comparison
shows what the wrappers cost in memory and in work per step, not NCCL's bandwidth — the GPU
numbers are for ``bench/gpu_check.py``-style runs on a GPU machine (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "ddp": ROOT / "launch" / "configs" / "cpu-2proc.yaml",
    "zero1": ROOT / "launch" / "configs" / "deepspeed_zero1.yaml",
    "zero2": ROOT / "launch" / "configs" / "deepspeed_zero2.yaml",
}
WARMUP = 3


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One rank: the training setup of cxr/train.py, then timed steps on random batches."""
    import torch
    import torch.nn.functional as F

    from cxr.config import load_config
    from cxr.models import build_model, count_parameters
    from cxr.runs.distributed import configure_deepspeed, make_accelerator
    from cxr.training.setup import build_optimizer

    torch.set_num_threads(1)
    cfg = load_config(
        "cxr/configs/tiny.yaml",
        [f"model.name={args.model}", f"data.resolution={args.resolution}", f"data.batch_size={args.batch}"],
    )
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(**cfg.model.kwargs())
    built = _rss_mb()
    optimizer = build_optimizer(cfg, model, model.l2_params()[0])  # as cxr/train.py
    configure_deepspeed(cfg, accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(accelerator.process_index)
    x = torch.randn(args.batch, 1, args.resolution, args.resolution, generator=g).to(accelerator.device)
    y = (torch.rand(args.batch, cfg.model.num_labels, generator=g) < 0.2).float().to(accelerator.device)
    times = []
    for step in range(WARMUP + args.steps):
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "rank": accelerator.process_index,
        "params": count_parameters(model.module if hasattr(model, "module") else model),
        "step_s": statistics.median(times),
        "peak_rss_mb": peak,
        "added_mb": peak - built,
    }
    Path(args.out, f"rank{accelerator.process_index}.json").write_text(json.dumps(row))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, model: str, args: argparse.Namespace) -> list[dict]:
    """One accelerate launch of the worker with ``mode``'s launcher config; the two ranks' rows."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            str(accelerate), "launch", "--config_file", str(MODES[mode]), "--main_process_port", str(_free_port()),
            __file__, "--worker", "--model", model, "--resolution", str(args.resolution),
            "--batch", str(args.batch), "--steps", str(args.steps), "--out", out,
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode} {model}: accelerate launch failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "densenet121"], help="model names of the suite")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="micro-batch per process")
    p.add_argument("--steps", type=int, default=12, help="timed steps per launch (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="launches per model and mode (modes alternate)")
    p.add_argument("--append", type=Path, help="append the table and the command to this Markdown file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    rows: dict[tuple[str, str], list[dict]] = {}
    t_start = time.time()
    for model in args.models:
        for r in range(args.rounds):
            order = args.modes if r % 2 == 0 else args.modes[::-1]
            for mode in order:
                rows.setdefault((model, mode), []).extend(launch(mode, model, args))
                print(f"  {model} {mode} round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    lines = [
        "| model (params) | mode | step s (median of ranks × rounds) | vs DDP | peak RSS MB/process | "
        "added over the built model MB/process |",
        "|---|---|---|---|---|---|",
    ]
    for model in args.models:
        base = statistics.median(r["step_s"] for r in rows.get((model, "ddp"), [{"step_s": float("nan")}]))
        for mode in args.modes:
            got = rows[(model, mode)]
            step = statistics.median(r["step_s"] for r in got)
            lines.append(
                f"| {model} ({got[0]['params'] / 1e6:.2f} M) | {mode} | {step:.3f} | {step / base:.2f}x | "
                f"{max(r['peak_rss_mb'] for r in got):.0f} | {statistics.median(r['added_mb'] for r in got):.0f} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.append:
        load = os.getloadavg()
        command = "python bench/ddp_vs_zero.py " + " ".join(a for a in (argv or sys.argv[1:]))
        text = (
            f"\n## DDP vs DeepSpeed ZeRO-1/2, 2 CPU processes (gloo), {args.resolution} px, micro-batch "
            f"{args.batch}\n\n`{command.strip()}` — {os.cpu_count()} cores, "
            f"load average {load[0]:.1f} at the end, {time.time() - t_start:.0f} s; {args.rounds} launches "
            f"per model and mode, {args.steps} timed steps each after {WARMUP} warm-up.\n\n{table}\n"
        )
        with open(args.append, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
