"""`python -m cxr.tools.explain`: the parser, the plan of which (image, label) pairs to explain,
and main (every run, gathered over ranks, then index.html, runs.json and the localisation report)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr.tools.explain.boxes import BOX_SPELLINGS, format_runs_table, read_boxes, write_localisation
from cxr.tools.explain.maps import METHOD_NAMES, METHODS, MIN_MAP
from cxr.tools.explain.masters import Masters
from cxr.tools.explain.overlays import write_index
from cxr.tools.explain.run import Job, explain_run, select_keys
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from cxrbase.labels import LABELS
from shards import remote
from shards.manifest import load_manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.tools.explain",
        description="Explain trained runs' predictions: CAM / Grad-CAM / saliency overlays on the full-"
        "resolution master images (PNG per image and label + index.html), and with --bbox the "
        "localisation scores against ground-truth boxes (pointing-game hit, IoU at a threshold, "
        "energy inside the box, chance rate) per label and overall with bootstrap CIs. Under "
        "`accelerate launch` each rank explains a disjoint share; rank 0 writes the tables.",
        epilog="Examples:\n"
        "  python -m cxr.tools.explain --run runs/d121 --shards data/shards --split test --keys 00000001_000 \\\n"
        "      --labels Cardiomegaly,Effusion --method gradcam --out explain/\n"
        "  python -m cxr.tools.explain --run runs/d121 --shards data/shards --bbox "
        "../shared/data/nih/BBox_List_2017.csv.gz --out loc/\n"
        "  python -m cxr.tools.explain --runs runs/r224 runs/r1024 --shards data/shards --bbox FILE --out loc/\n"
        "  python -m cxr.tools.explain --run runs/tiny --shards data/shards --bbox FILE --layer trunk.blocks.4 --out loc4/\n"
        "Grad-CAM's layer: the deepest candidate with a map ≥ --min-map cells a side unless --layer is given; "
        "the output names it.\n"
        "--debug shows the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run", help="one training run dir (config.yaml + checkpoints/best)")
    runs.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN",
        help="several run dirs: each is explained, and with --bbox the table across runs "
        "(localisation vs resolution) is printed",
    )
    _add_selection_arguments(p)
    _add_scoring_arguments(p)
    p.add_argument(
        "--resolution", type=int, default=None, help="explain at R×R (default: each run's training resolution)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch per rank (default: the run's eval batch)"
    )
    p.add_argument("--backend", choices=["dali", "wds"], default=None, help="loader back end (default: the run's)")
    p.add_argument("--num-threads", type=int, default=None, help="loader threads/workers per rank (default: the run's)")
    p.add_argument("--loader-device", choices=["cpu", "gpu"], default=None, help="where the loader decodes")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return p


def _add_selection_arguments(p: argparse.ArgumentParser) -> None:
    """What to explain and how: --shards, --split, --keys, --labels, --method, --layer, --min-map, --out."""
    p.add_argument("--shards", required=True, help="shards folder with manifest.json (masters)")
    p.add_argument("--split", default="test", help="split to explain (default: test)")
    p.add_argument("--keys", default=None, help="comma-separated image keys to draw overlays for")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated labels to explain for --keys (default: every label); "
        "with --bbox: restrict the scored labels",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="gradcam",
        help="cam (pooled-linear heads), gradcam (any model), saliency (default: gradcam)",
    )
    p.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help="Grad-CAM's layer, a module name of the model (e.g. trunk.blocks.3.2 for the cnn); "
        "default: the deepest of the model's candidate layers whose map is ≥ --min-map cells a side "
        "(the final map when it is that fine), said in the output",
    )
    p.add_argument(
        "--min-map",
        type=int,
        default=MIN_MAP,
        metavar="N",
        help=f"the default layer's smallest map side (default: {MIN_MAP})",
    )
    p.add_argument("--out", required=True, help="output folder")


def _add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """Localisation scoring: --bbox, --bbox-frame, --threshold, the bootstrap, --limit, --overlays."""
    p.add_argument(
        "--bbox",
        default=None,
        metavar="FILE",
        help="BBox_List_2017.csv[.gz] layout (NIH, or synth's boxes.csv): score localisation "
        "on every image of the split with a box",
    )
    p.add_argument(
        "--bbox-frame",
        type=int,
        default=None,
        metavar="N",
        help="pixel frame of the box file (N×N); default: each master image's own size "
        "(the NIH masters are the 1024² originals the NIH boxes refer to)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="IoU: the map is thresholded at this fraction of its maximum (default: 0.5)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs; 0: none (default: 1000)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="with --bbox: score at most this many images (quick looks)")
    p.add_argument("--overlays", action="store_true", help="with --bbox: also write an overlay per scored pair")


def _parse_labels(text: str | None, default: Sequence[str]) -> list[str]:
    """--labels (comma-separated) checked against ``default``, the model's labels (any data set's)."""
    if text is None:
        return list(default)
    labels = [BOX_SPELLINGS.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    unknown = [t for t in labels if t not in default]
    if unknown:
        raise CxrError(f"--labels {text}: unknown {unknown} — the model's labels are {', '.join(default)}")
    return labels


def plan_job(args: argparse.Namespace, masters: Masters, names: Sequence[str] = LABELS) -> tuple[Job, dict]:
    """Which (key, label) pairs to explain, their boxes, and the counts the report states.
    ``names``: the model's labels (the first run's; the 14 NIH ones or any data set's)."""
    out = Path(args.out)
    keys = masters.index.keys
    boxes: dict[tuple[str, str], pd.DataFrame] = {}
    counts = {"split_images": len(keys)}
    if args.bbox:
        table = read_boxes(args.bbox)
        wanted = set(_parse_labels(args.labels, names))
        in_split = table[table["key"].isin(set(keys)) & table["label"].isin(wanted)]
        chosen = sorted(set(in_split["key"]))
        if args.keys:  # score (and draw) only these
            chosen = [
                k
                for k in select_keys(keys, args.keys.split(","), remote.location(args.shards), args.split)
                if k in set(chosen)
            ]
        chosen = chosen[: args.limit] if args.limit else chosen
        in_split = in_split[in_split["key"].isin(set(chosen))]
        boxes = {kl: g for kl, g in in_split.groupby(["key", "label"])}
        labels = {k: sorted({lab for kk, lab in boxes if kk == k}, key=list(names).index) for k in chosen}
        counts.update(
            scored_images=len(chosen), scored_pairs=len(boxes), boxed_elsewhere=len(set(table["key"]) - set(keys))
        )
        if not labels:
            raise CxrError(
                f"{args.bbox}: no box of {sorted(wanted)} is on an image of split {args.split!r} — "
                "NIH boxes are almost all on the official test list; use that split"
            )
    else:
        if not args.keys:
            raise CxrError("--keys: which images to explain? — pass --keys K1,K2 (or --bbox FILE to score a split)")
        chosen = select_keys(keys, args.keys.split(","), remote.location(args.shards), args.split)
        labels = {k: _parse_labels(args.labels, names) for k in chosen}
    overlays = bool(args.keys) or args.overlays
    return Job(args.method, labels, boxes, out, overlays, args.threshold, args.bbox_frame, tuple(names)), counts


def _gather(items: list, state: Any) -> list | None:
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        items = gather_object(items)
    return items if state.is_main_process else None


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 0 or not 0 < args.alpha < 1 or not 0 < args.threshold <= 1 or args.min_map < 1:
        raise CxrError(
            "--bootstrap must be ≥ 0, --alpha in (0, 1), --threshold in (0, 1], --min-map ≥ 1 — fix the flags"
        )
    start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from cxr.evaluation.inference import member_names, process_state
    from cxr.runs.open import EvalOptions, read_member

    run_dirs = [args.run] if args.run else list(args.runs)
    shards = remote.location(args.shards)
    load_manifest(shards)  # a missing or invalid manifest fails before any process group starts
    state = process_state(args.cpu)
    masters = Masters.open(shards, args.split)
    names = read_member(run_dirs[0], member_names(run_dirs[:1])[0]).labels  # the model's labels
    job, counts = plan_job(args, masters, names)
    opts = EvalOptions.from_flags(args)
    rows, entries, runs = [], [], []
    for run_dir, name in zip(run_dirs, member_names(run_dirs)):
        r, e, info = explain_run(run_dir, name, opts, args.split, state, job, masters, args.layer, args.min_map)
        rows += r
        entries += e
        runs.append(info)
    rows, entries = _gather(rows, state), _gather(entries, state)
    masters.reader.close()
    if rows is None:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if entries:
        write_index(out, entries, f"{METHOD_NAMES[args.method]} on split {args.split}")
    atomic_write_text(
        out / "runs.json", json.dumps({"runs": runs, "counts": counts, "method": args.method}, indent=2) + "\n"
    )
    took = time.perf_counter() - start
    n_maps = len(rows) if job.boxes else len(entries)
    if job.boxes:
        pairs = pd.DataFrame(rows).drop_duplicates(["run", "key", "label"])
        counts["scored_pairs"] = int(pairs.groupby("run").size().max())
        summary = write_localisation(out, pairs, runs, counts, args)
        print(format_runs_table(summary, runs))
        print(
            f"localisation: {counts['scored_images']} of {counts['split_images']} images of '{args.split}' scored "
            f"({counts['scored_pairs']} pairs) × {len(runs)} run(s) on {state.num_processes} rank(s) in {took:.1f} s; "
            f"report: {out / 'localisation.md'}"
        )
    if entries:
        print(f"overlays: {len(entries)} PNG(s) → {out / 'index.html'}")
    print(
        f"explained {n_maps} (image, label) pair(s) with {METHOD_NAMES[args.method]} in {took:.1f} s "
        f"({n_maps / max(took, 1e-9):.2f}/s)"
    )
    return 0
