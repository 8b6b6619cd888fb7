"""Overhead of the training loop (cxr.train) over a bare torch loop, measured side by side.

Both loops train the same model on the same in-memory tensors with the same threads:

- bare:  for x, y in batches: loss = bce(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
- cxr:   cxr.train.train(cfg, loader_fn=in-memory loader) — accelerate, accumulation context,
         running loss on device, per-step stop-flag check, progress bookkeeping, step logging.

Steady-state images/s is timed from the request of batch `--warmup` to the end of the epoch
(the loader notes the times), so model build, validation and checkpoint writing are excluded
from that ratio; the end-to-end wall time of train() (setup + validation + checkpoints) is
printed as well. Runs alternate bare/cxr `--repeats` times (which goes first alternates too);
medians are compared.

    python bench/train_overhead.py [--model cnn] [--resolution 64] [--batch 16] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.config import load_config  # noqa: E402
from cxr.models import build_model  # noqa: E402
from cxr.train import train  # noqa: E402


def make_data(n_batches: int, batch: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_batches, batch, 1, res, res, generator=g), (
        torch.rand(n_batches, batch, 14, generator=g) < 0.3
    ).float()


class Clock:
    """Wall and process-CPU time from the request of batch `warmup` to the end of iteration
    (CPU time of this single-threaded process is far less disturbed by other jobs on the machine)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.cpu_start, self.cpu_end = warmup, None, None, None, None

    def tick(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def tock(self) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


def bare_loop(args, images, labels, clock: Clock) -> None:
    torch.manual_seed(0)
    model = build_model(args.model, 14)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    for i in range(len(images)):
        if i == clock.warmup:
            clock.tick()
        loss = F.binary_cross_entropy_with_logits(model(images[i]), labels[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tock()


def cxr_loop(args, images, labels, clock: Clock, run_dir: Path) -> float:
    """Run cxr.train.train for one epoch over the tensors; returns its end-to-end wall time."""

    class MemoryLoader:
        def __init__(self, cfg, split, rank=0, world_size=1, epoch=0, skip_batches=0, train=None):
            self.split = split
            self.n = len(images) if split == "train" else 1  # one val batch: validation stays cheap

        def __len__(self):
            return self.n

        def __iter__(self):
            for i in range(self.n):
                if self.split == "train" and i == clock.warmup:
                    clock.tick()
                yield {
                    "image": images[i],
                    "labels": labels[i],
                    "meta": torch.zeros(len(images[i]), 5),
                    "key": [f"{self.split}{i:03d}_{j:03d}" for j in range(len(images[i]))],
                }
            if self.split == "train":
                clock.tock()

        def report(self):
            return {"samples": 0, "skipped": 0, "skipped_keys": []}

    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            "data.batch_size=%d" % args.batch,
            f"data.resolution={args.resolution}",
            "train.epochs=1",
            f"train.threads={args.threads}",
            "schedule.name=constant",
            "optim.lr=1e-4",
            "logging.progress=false",
            "logging.log_every=20",
            f"checkpoint.run_dir={run_dir}",
            "train.mixed_precision=no",
        ],
    )
    t0 = time.perf_counter()
    status = train(cfg, loader_fn=MemoryLoader)
    assert status == 0, status
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", help="model of the suite (default cnn)")
    p.add_argument("--resolution", type=int, default=64, help="image side (default 64)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both loops (default 1)")
    p.add_argument("--repeats", type=int, default=6, help="alternating bare/cxr pairs (default 6)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = make_data(args.steps, args.batch, args.resolution)
    timed = (args.steps - args.warmup) * args.batch
    rates = {"bare": [], "cxr": [], "bare_cpu": [], "cxr_cpu": []}
    wall = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # alternate which loop goes first, so warm caches or a drifting load favour neither
            for which in ("bare", "cxr") if r % 2 == 0 else ("cxr", "bare"):
                clock = Clock(args.warmup)
                if which == "bare":
                    bare_loop(args, images, labels, clock)
                else:
                    wall.append(cxr_loop(args, images, labels, clock, Path(tmp) / f"run{r}"))
                rates[which].append(timed / (clock.end - clock.start))
                rates[which + "_cpu"].append(timed / (clock.cpu_end - clock.cpu_start))
            print(
                f"repeat {r + 1}: bare {rates['bare'][-1]:.1f} img/s ({rates['bare_cpu'][-1]:.1f} per CPU s), "
                f"cxr.train {rates['cxr'][-1]:.1f} img/s ({rates['cxr_cpu'][-1]:.1f} per CPU s)",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"model {args.model} {args.resolution}px batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), "
        f"{args.threads} thread(s), median of {args.repeats}:"
    )
    print(f"  bare torch loop : {med['bare']:8.1f} img/s wall   {med['bare_cpu']:8.1f} img per CPU s")
    print(f"  cxr.train loop  : {med['cxr']:8.1f} img/s wall   {med['cxr_cpu']:8.1f} img per CPU s")
    print(
        f"  overhead (goal ≤ 5 %): wall {100 * (med['bare'] - med['cxr']) / med['bare']:+.1f} %, "
        f"CPU time {100 * (med['bare_cpu'] - med['cxr_cpu']) / med['bare_cpu']:+.1f} %"
    )
    print(
        f"  cxr.train end-to-end incl. setup, validation, checkpoints: {statistics.median(wall):.1f} s for "
        f"{args.steps * args.batch} images ({args.steps * args.batch / statistics.median(wall):.1f} img/s)"
    )


if __name__ == "__main__":
    main()
