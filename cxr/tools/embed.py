"""``python -m cxr.tools.embed``: a trained run's penultimate features of a split, a 2-D t-SNE map and
k-NN label agreement in feature space.

    python -m cxr.tools.embed --run runs/d121 --shards data/shards --split test --out embed/d121

Writes into OUT (atomically):

- ``embeddings.parquet`` — one row per image: ``key``, ``split``, ``labels`` (list of 0/1 in the
  shards' label order), ``features`` (list of float32: ``model.pooled``, the input of the final
  linear layer — the globally pooled final feature map for the pooled-linear models).
- ``tsne.png`` — the t-SNE map (scikit-learn ``TSNE``, PCA init, seeded): one panel per chosen
  label (``--labels``, default all) coloured positive / negative, plus one panel coloured by
  each image's most frequent finding (its positive label that is most common in the split;
  "No Finding" when it has none). ``tsne.csv`` holds the map's coordinates (key, x, y).
- ``knn.json`` — k-NN label agreement: for each image its ``k`` nearest neighbours (euclidean on
  standardised features, scikit-learn ``NearestNeighbors``, itself excluded); per label the
  fraction of (image, neighbour) pairs with the same label value, against chance
  p² + (1 − p)² (two random images of prevalence p agree that often), kappa = (agreement − chance)
  / (1 − chance) (0 at chance, 1 when every neighbour agrees), and the macro means.

Uses the run's ``checkpoints/best`` and its data settings, like ``cxr.evaluate``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from cxrbase.labels import UNKNOWN

NO_FINDING = "No Finding"


def extract(
    run: str | Path,
    shards: str | Path,
    split: str,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(keys [N], features float32 [N, D], labels uint8 [N, L], label names) of ``split``."""
    import torch

    from cxr.data import build_loader
    from cxr.evaluation.inference import shards_labels
    from cxr.runs.open import EvalOptions, feed, on_device, open_member, renormaliser
    from cxrbase.progress import progress as progress_bar

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = shards_labels(shards)

    def check(member) -> None:
        if list(member.labels) != list(names):
            raise CxrError(
                f"{shards}/manifest.json: run {run} was trained on labels {member.labels[:3]}… but the "
                f"shards have {names[:3]}… — embed it on shards with its own label set"
            )

    member = open_member(run, Path(run).name, dev, check)
    opts = EvalOptions(shards=str(shards), batch_size=batch_size)
    cfg = member.loader_config(opts, member.resolution or 224, on_gpu=dev.type == "cuda")
    loader = build_loader(cfg, split, epoch=0, train=False)
    renorm = renormaliser(member, cfg, dev)
    keys, feats, labels = [], [], []
    with torch.inference_mode():
        for batch in progress_bar(loader, desc=f"embed {split}", unit="batch", disable=not progress):
            feats.append(feed(member.model, *on_device(batch, dev), renorm, call="pooled").float().cpu().numpy())
            y = batch["labels"].numpy()
            labels.append(np.where(np.isnan(y), UNKNOWN, y.round()).astype(np.uint8))  # 255: unknown, as on disk
            keys.extend(str(k) for k in batch["key"])
    if not keys:
        raise CxrError(f"{shards}: split {split!r} has no images — choose another --split")
    return keys, np.concatenate(feats), np.concatenate(labels), list(names)


def knn_agreement(features: np.ndarray, labels: np.ndarray, names: Sequence[str], k: int = 10) -> dict[str, Any]:
    """Per-label agreement of each image's k nearest neighbours with it, against chance p² + (1 − p)²."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    if n < 2:
        raise CxrError(f"k-NN agreement needs at least 2 images, got {n} — use a larger split")
    k = min(k, n - 1)
    z = StandardScaler().fit_transform(features.astype(np.float64))
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    # Drop each image itself (the first neighbour at distance 0, unless duplicates tie with it).
    neighbours = np.array([[j for j in row if j != i][:k] for i, row in enumerate(idx)])
    y, known = labels == 1, labels != UNKNOWN  # pairs where either image does not know a label are left out
    pair = known[neighbours] & known[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        agree = ((y[neighbours] == y[:, None, :]) & pair).sum(axis=(0, 1)) / pair.sum(axis=(0, 1))
        p = y.sum(axis=0) / known.sum(axis=0)
    chance = p**2 + (1 - p) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(chance < 1, (agree - chance) / (1 - chance), np.nan)
    per_label = {
        name: {"agreement": float(a), "chance": float(c), "kappa": float(kp), "prevalence": float(q)}
        for name, a, c, kp, q in zip(names, agree, chance, kappa, p)
    }
    return {
        "k": int(k),
        "n": int(n),
        "mean_agreement": float(np.nanmean(agree)) if np.isfinite(agree).any() else float("nan"),
        "mean_chance": float(np.nanmean(chance)) if np.isfinite(chance).any() else float("nan"),
        "mean_kappa": float(np.nanmean(kappa)) if np.isfinite(kappa).any() else float("nan"),
        "per_label": per_label,
    }


def most_frequent_finding(labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per image, its positive label that is most frequent in the set ("No Finding" if none)."""
    order = np.argsort(-(labels == 1).sum(axis=0), kind="stable")  # most frequent first
    out = np.full(len(labels), NO_FINDING, dtype=object)
    for c in order[::-1]:  # later (more frequent) labels overwrite rarer ones
        out[labels[:, c] == 1] = names[c]
    return out


def tsne_map(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of standardised features (PCA init, perplexity ≤ 30 and < n/3)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    if n < 5:
        raise CxrError(f"t-SNE needs at least 5 images, got {n} — use a larger split")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.5)))
    z = StandardScaler().fit_transform(features.astype(np.float64))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(z)


def plot_map(
    path: Path, xy: np.ndarray, labels: np.ndarray, names: Sequence[str], chosen: Sequence[str], title: str
) -> None:
    """tsne.png: one panel per chosen label (positive / negative) + one by most frequent finding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(chosen) + 1
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, name in zip(axes, chosen):
        pos = labels[:, list(names).index(name)] == 1
        ax.scatter(*xy[~pos].T, s=6, c="0.75", label=f"negative ({int((~pos).sum())})")
        ax.scatter(*xy[pos].T, s=8, c="tab:red", label=f"positive ({int(pos.sum())})")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="best", markerscale=2)
    ax = axes[len(chosen)]
    finding = most_frequent_finding(labels, names)
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(dict.fromkeys([NO_FINDING, *(n for n in names if (finding == n).any())])):
        mine = finding == name
        if mine.any():
            ax.scatter(*xy[mine].T, s=6, color="0.8" if name == NO_FINDING else cmap(i % 20), label=name)
    ax.set_title("most frequent finding", fontsize=10)
    ax.legend(fontsize=6, loc="best", markerscale=2, ncol=2)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


def write_embeddings(path: Path, keys: Sequence[str], split: str, features: np.ndarray, labels: np.ndarray) -> None:
    """embeddings.parquet: key, split, labels (list of uint8), features (list of float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "split": pa.array([split] * len(keys), pa.string()),
            "labels": pa.array([row.tolist() for row in labels.astype(np.uint8)], pa.list_(pa.uint8())),
            "features": pa.array([row.tolist() for row in features.astype(np.float32)], pa.list_(pa.float32())),
        }
    )
    with atomic_write(path, "wb") as fh:
        pq.write_table(table, fh)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.tools.embed",
        description="Embed a split with a trained run: penultimate features (embeddings.parquet), a t-SNE "
        "map (tsne.png, tsne.csv) with one panel per label plus one by most frequent finding, and k-NN "
        "label agreement in feature space against chance (knn.json). --debug shows tracebacks.",
        epilog="Example: python -m cxr.tools.embed --run runs/d121 --shards data/shards --split test --out embed/d121",
    )
    p.add_argument("--run", required=True, help="training run dir (uses checkpoints/best and config.yaml)")
    p.add_argument("--shards", required=True, help="shards folder with manifest.json (the run's label set)")
    p.add_argument("--split", default="test", help="split to embed (default test)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="labels with a t-SNE panel each (default: all labels of the shards)",
    )
    p.add_argument("--k", type=int, default=10, help="neighbours for the k-NN agreement (default 10)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch (default: the run's eval batch)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.k < 1:
        raise CxrError(f"--k {args.k}: use at least 1 neighbour")
    out = Path(args.out)
    keys, feats, labels, names = extract(
        args.run,
        args.shards,
        args.split,
        batch_size=args.batch_size,
        device="cpu" if args.cpu else None,
        progress=not args.no_progress,
    )
    chosen = args.labels or names
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise CxrError(f"--labels {unknown}: not labels of {args.shards} — choose among {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    write_embeddings(out / "embeddings.parquet", keys, args.split, feats, labels)
    knn = knn_agreement(feats, labels, names, args.k)
    atomic_write_text(out / "knn.json", json.dumps({"run": str(args.run), "split": args.split, **knn}, indent=2) + "\n")
    xy = tsne_map(feats, args.seed)
    with atomic_write(out / "tsne.csv", "w") as fh:
        pd.DataFrame({"key": keys, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(fh, index=False, lineterminator="\n")
    plot_map(
        out / "tsne.png",
        xy,
        labels,
        names,
        chosen,
        f"t-SNE of {Path(args.run).name} features — split '{args.split}', {len(keys)} images",
    )
    print(
        f"embed: {len(keys)} images × {feats.shape[1]} features of {args.run} ({args.split}); "
        f"{knn['k']}-NN label agreement {knn['mean_agreement']:.3f} vs chance {knn['mean_chance']:.3f} "
        f"→ {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
