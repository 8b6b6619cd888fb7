"""Benchmark of the resolution study's two measured inputs.

    python bench/ablation.py probe --config cxr/configs/phantom_sweep.yaml --resolutions 32 64 128 \
        --effective-batch 16 --budget-mb 1200
    python bench/ablation.py speed --runs RUNS/res32 RUNS/res64 RUNS/res128 --steps 20

``probe``: for each resolution, the memory probe's predicted peak at the micro-batch it
chooses (linear fit through b = 1, 2) against a fresh measurement of one training step at
that micro-batch (peak CUDA memory on GPU, peak RSS on CPU): the ratio measured/predicted.

``speed``: the training images/s a sweep's run reports (throughput.csv, median over its
epochs, training loop only) against the same model, micro-batch and resolution timed alone
(random inputs, forward + backward + Adam step, no loader): the ratio tells how much
of the sweep's throughput the loader and the loop's bookkeeping cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_probe(args: argparse.Namespace) -> None:
    from cxr.training.probe import choose, measure

    print("| resolution | micro-batch × accum | checkpointing | predicted MB | measured MB | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for res in args.resolutions:
        t0 = time.perf_counter()
        got = choose(args.config, [], res, args.effective_batch, device=args.device, budget_mb=args.budget_mb)
        extra = [f"model.grad_checkpointing={str(got.grad_checkpointing).lower()}"]
        measured = measure(args.config, extra, res, got.micro_batch, got.device)
        print(
            f"| {res} | {got.micro_batch} × {got.grad_accum} | {got.grad_checkpointing} | {got.peak_mb:.0f} | "
            f"{measured:.0f} | {measured / got.peak_mb:.3f} |  <!-- {time.perf_counter() - t0:.0f} s -->",
            flush=True,
        )


def _timed_alone(config: dict, steps: int, threads: int) -> float:
    import torch

    from cxr.models import build_model

    torch.set_num_threads(threads)
    model_cfg = dict(config["model"])
    options = model_cfg.pop("options", {}) or {}
    model = build_model(**{**model_cfg, **options, "pretrained": None}).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    b, res = int(config["data"]["batch_size"]), int(config["data"]["resolution"])
    x = torch.randn(b, 1, res, res)
    y = (torch.rand(b, int(model_cfg.get("num_labels", 14))) < 0.2).float()
    for i in range(steps + 3):
        if i == 3:  # warm-up done
            t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * b / (time.perf_counter() - t0)


def bench_speed(args: argparse.Namespace) -> None:
    import yaml

    from cxr.runs.run_log import read_throughput

    print("| run | resolution | micro-batch | sweep images/s | alone images/s | sweep / alone |")
    print("|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        config = yaml.safe_load((run / "config.yaml").read_text())
        sweep = float(read_throughput(run)["train_images_per_s"].median())
        alone = _timed_alone(config, args.steps, args.threads or int(config["train"].get("threads") or 1))
        print(
            f"| {run.name} | {config['data']['resolution']} | {config['data']['batch_size']} | {sweep:.1f} | "
            f"{alone:.1f} | {sweep / alone:.2f} |",
            flush=True,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("probe", help="probe prediction vs measured peak per resolution")
    q.add_argument("--config", required=True)
    q.add_argument("--resolutions", type=int, nargs="+", required=True)
    q.add_argument("--effective-batch", type=int, default=16)
    q.add_argument("--budget-mb", type=float, default=None, help="budget instead of 80 %% of the device")
    q.add_argument("--device", default=None)
    s = sub.add_parser("speed", help="a sweep's reported images/s vs the model timed alone")
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's train.threads)")
    args = p.parse_args()
    (bench_probe if args.command == "probe" else bench_speed)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
