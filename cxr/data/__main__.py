"""`python -m cxr.data inspect`: iterate a loader once and say what came out (and how fast)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence

from cxrbase.atomic import atomic_write
from cxrbase.errors import cli_entry
from cxrbase.labels import LABELS
from cxrbase.progress import progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr.data", description="Inspect what the loaders deliver.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inspect",
        help="iterate one epoch of a split and print counts, key hash, images/s",
        description="Iterate one epoch (or --limit batches) of SPLIT for one rank and print "
        "samples, batches, unique keys, sha256 of the sorted keys (joined by newlines), images/s.",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="shards folder with manifest.json, or its URL (s3://…, https://…; --backend wds)",
    )
    p.add_argument("--split", required=True, help="split to read (train, val, test)")
    p.add_argument("--backend", choices=["dali", "wds"], default="dali", help="loader back end (default dali)")
    p.add_argument("--resolution", type=int, default=1024, help="image side R in pixels (default 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size per rank (default 16)")
    p.add_argument("--rank", type=int, default=0, help="rank to simulate (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks to simulate (default 1)")
    p.add_argument("--epoch", type=int, default=0, help="epoch (changes the training shuffle; default 0)")
    p.add_argument("--seed", type=int, default=0, help="shuffle/augmentation seed (default 0)")
    p.add_argument(
        "--mode",
        choices=["auto", "train", "eval"],
        default="auto",
        help="train: shuffled, full batches, augmented; eval: every sample once (auto: train iff split is train)",
    )
    p.add_argument("--no-augment", action="store_true", help="turn training augmentation off")
    p.add_argument("--num-threads", type=int, default=2, help="DALI threads / DataLoader workers (default 2)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: DALI mixed decode (default cpu)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many batches")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--save-grid",
        default=None,
        metavar="PNG",
        help="write a grid of up to 16 images of the first batch, titled with their findings",
    )
    return parser


def inspect(args: argparse.Namespace) -> dict:
    """Run the loader once as asked; returns the summary dict (also printed)."""
    from cxr.data import DataConfig, build_loader, image_source

    cfg = DataConfig(
        shards=args.shards,
        backend=args.backend,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
        device=args.device,
        seed=args.seed,
        augment=not args.no_augment,
    )
    train = None if args.mode == "auto" else args.mode == "train"
    loader = build_loader(cfg, args.split, rank=args.rank, world_size=args.world_size, epoch=args.epoch, train=train)
    keys: list[str] = []
    batches, start = 0, time.perf_counter()
    total = len(loader) if args.limit is None else min(args.limit, len(loader))
    for batch in progress(loader, total=total, unit="batch", disable=args.json):
        if batches == 0 and args.save_grid:
            save_grid(batch, cfg, args.save_grid)
        keys += batch["key"]
        batches += 1
        if args.limit is not None and batches >= args.limit:
            break
    seconds = time.perf_counter() - start
    return {
        "split": args.split,
        "backend": args.backend,
        "resolution": args.resolution,
        "rank": args.rank,
        "world_size": args.world_size,
        "train": loader.train,
        "samples": len(keys),
        "batches": batches,
        "planned_batches": len(loader),
        "unique_keys": len(set(keys)),
        "keys_sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(keys) / seconds, 1) if seconds else None,
        "skipped": loader.report()["skipped"] if args.limit is None else None,
        "images": image_source(args.shards, args.resolution),
    }


def save_grid(batch: dict, cfg, path: str, max_images: int = 16) -> None:
    """Grid of the first images of a batch (de-normalized to [0, 1]) titled with their findings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, len(batch["key"]))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    from cxr.data.batch import to_device

    images = to_device(batch, "cpu")  # the model's input, as training sees it
    for j in range(n):
        img = (images[j, 0] * cfg.std + cfg.mean).clamp(0, 1).numpy()
        found = [LABELS[c] for c in range(len(LABELS)) if batch["labels"][j, c] > 0.5] or ["No Finding"]
        ax = axes.flat[j]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{batch['key'][j]}\n{', '.join(found)}", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")
    summary = inspect(args)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['split']} ({'train' if summary['train'] else 'eval'}, rank {args.rank}/{args.world_size}, "
            f"{args.backend}, {args.resolution}px): {summary['samples']} samples in {summary['batches']} batches, "
            f"{summary['unique_keys']} unique keys, keys sha256 {summary['keys_sha256'][:16]}…, "
            f"{summary['images_per_s']} images/s"
        )
        source = summary["images"]
        print(f"images: {source['source']}; resize filter: {source['resize_filter']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
