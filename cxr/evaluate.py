"""`python -m cxr.evaluate` — infer trained members on a split, ensemble them, report.

    python -m cxr.evaluate --runs RUN [RUN ...] --shards DIR --split test --out REPORT
    accelerate launch [--multi_gpu --num_processes N] -m cxr.evaluate ...   # distributed
    python -m cxr.evaluate --from-predictions REPORT/predictions.parquet --out REPORT2

A separate job from training that never trains: every member is rebuilt from its
run's ``config.yaml`` (``model:`` → ``build_model``), loads ``checkpoints/best``
without unpickling code, and runs in eval mode under ``torch.inference_mode``. The
split is read once and every member scores each batch. Under a launcher each rank
infers a disjoint part of the split; keys and probabilities are gathered on rank 0,
which checks that every image of the split was scored exactly once and writes
(atomically) ``predictions.parquet``, ``aucs.csv``, ``thresholds.json``,
``metrics.csv``, ``members.json``, ``roc.png``, ``pr.png`` and ``report.md``.

predictions.parquet is long: one row per (split, member, key) with one probability column per label
(the shards' label names: the 14 NIH ones or a generic table's, float64) and the ground-truth columns ``true_<Label>``
(0/1); the ensemble is member ``ensemble``; both the evaluated split and the threshold
split are in it, so ``--from-predictions`` needs nothing else. The ensemble is always
recomputed from the member rows (``--ensemble``), in both modes, so a re-analysis
reproduces the tables exactly.

Resolution policy: all members must share the shards' label set, else they are
refused. Each member is inferred at its own training resolution: members are grouped
by resolution and the split is read once per distinct resolution (the loader decodes
and resizes each image to that resolution, with the same filter as training used),
then the groups' scores are joined by key. One pass per resolution, not one decode
resized per member, because it reuses the training loaders unchanged (derived
``resN/`` shards where packed, so high resolutions never decode the 1024² masters
twice) and every member sees exactly the pixels it was trained on; the extra decodes
cost a few passes at the lower resolutions, which are the cheap ones. ``--resolution R``
instead evaluates every member at R×R (the suite's models take any input size); the
report lists each member's training resolution next to it.

Where the parts live: cxr.inference (members, their models, inference, ensemble),
cxr.predictions (predictions.parquet and members.json), cxr.report (the analysis, tables,
figures and report.md) and cxr.metrics (the formulas); this module is the CLI and the
orchestration.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr.inference import infer_runs, process_state, with_ensemble
from cxr.predictions import check_score_sets, read_members, read_predictions, write_predictions
from cxr.report import ENSEMBLE, ScoreSet
from cxrbase.errors import CxrError, cli_entry


# ------------------------------------------------------------ orchestration --

def load_saved(args: argparse.Namespace) -> tuple[dict[str, ScoreSet], list[dict[str, Any]]]:
    """--from-predictions: the saved scores and, if beside them, members.json."""
    path = Path(args.from_predictions)
    if not path.is_file():
        raise CxrError(f"{path}: predictions file not found — pass REPORT/predictions.parquet")
    return read_predictions(path), read_members(path)


def _splits_needed(args: argparse.Namespace) -> list[str]:
    thr = None if args.thresholds_from in (None, "none") else args.thresholds_from
    return [args.split] + ([thr] if thr and thr != args.split else [])


def _context(args: argparse.Namespace, source: str) -> dict[str, Any]:
    notes = []
    if args.thresholds_from == args.split:
        notes.append(f"thresholds were tuned on the evaluated split `{args.split}` itself: "
                     "the threshold metrics are optimistic")
    return {"ensemble": args.ensemble, "bootstrap": args.bootstrap, "seed": args.seed,
            "alpha": args.alpha, "thresholds_from": args.thresholds_from, "source": source,
            "notes": notes}


def analyse_and_write(args: argparse.Namespace, per_split: dict[str, ScoreSet],
                      infos: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Ensemble, write predictions, compute every table and the report; return a summary."""
    from cxr.report import analyse, write_outputs

    out = Path(args.out)
    for split in _splits_needed(args):
        if split not in per_split:
            raise CxrError(f"{source}: no predictions for split {split!r} (has {sorted(per_split)}) — "
                           "choose --split/--thresholds-from among those, or --thresholds-from none")
    check_score_sets(per_split, source)  # freshly inferred scores too: nothing is written before this
    per_split = {k: with_ensemble(v, args.ensemble) for k, v in per_split.items()}
    write_predictions(out, per_split, infos)
    tuning_split = None if args.thresholds_from in (None, "none") else args.thresholds_from
    scores = per_split[args.split]
    t0 = time.perf_counter()
    analysis = analyse(scores, per_split.get(tuning_split) if tuning_split else None,
                       tuning_split=tuning_split, n_boot=args.bootstrap, seed=args.seed, alpha=args.alpha)
    seconds = {"analysis": time.perf_counter() - t0}
    seconds.update(write_outputs(out, analysis, scores, split=args.split, context=_context(args, source),
                                 members=infos, figures=not args.no_figures))
    return {"analysis": analysis, "scores": scores, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.evaluate",
        description="Evaluate trained runs (an ensemble of members) on a split of packed shards: "
        "per-label AUROC with bootstrap CIs, AUPRC, tuned thresholds, threshold metrics, ROC/PR "
        "figures and report.md. Never trains. Under `accelerate launch` each rank infers a "
        "disjoint part of the split and rank 0 writes the report.",
        epilog="Writes OUT/{predictions.parquet, members.json, aucs.csv, thresholds.json, metrics.csv, "
        "roc.png, pr.png, report.md}. Examples:\n"
        "  python -m cxr.evaluate --runs runs/m1 runs/m2 --shards shards --split test --out report\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m cxr.evaluate --runs ... --out report\n"
        "  python -m cxr.evaluate --from-predictions report/predictions.parquet --out report2\n"
        "--debug shows the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="training run dirs (config.yaml + checkpoints/best); each is one member")
    p.add_argument("--shards", help="shards folder with manifest.json (python -m shards pack); default: the first "
                   "run's data.shards")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--thresholds-from", default="val",
                   help="split on which F1/Youden thresholds are tuned (inferred too); 'none': 0.5 only (default: val)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the AUROC CIs; 0: no CIs (default: 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    p.add_argument("--ensemble", choices=["mean-prob", "mean-logit"], default="mean-prob",
                   help="ensemble = mean of member probabilities (default), or sigmoid of their mean logit")
    p.add_argument("--from-predictions", metavar="FILE",
                   help="recompute every output from a saved predictions.parquet (no models, no shards)")
    p.add_argument("--resolution", type=int, default=None,
                   help="evaluate every member at R×R even if trained at other resolutions "
                   "(default: members must share one training resolution, else refused)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch per rank "
                   "(default: the first member's data.eval_batch_size / batch_size)")
    p.add_argument("--backend", choices=["dali", "wds"], default=None,
                   help="loader back end (default: the first member's data.backend)")
    p.add_argument("--num-threads", type=int, default=None, help="loader threads/workers per rank (default: the first member's data.num_threads)")
    p.add_argument("--loader-device", choices=["cpu", "gpu"], default=None,
                   help="where the loader decodes (default: the first member's data.device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype of the forward pass; bf16/fp16 for GPUs (default: fp32)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: torch's choice; 1 on shared CPUs)")
    p.add_argument("--no-figures", action="store_true", help="skip roc.png / pr.png")
    p.add_argument("--ood", metavar="RUN", help="an ood_ae run (cxr/ood.py): reject the split's images the gate "
                   "rejects and report mean AUROC on the accepted ones beside all (OUT/ood.csv; needs --shards)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.from_predictions and args.runs:
        p.error("give either --runs (infer) or --from-predictions (re-analyse), not both")
    if not args.from_predictions and not args.runs:
        p.error("--runs is required unless --from-predictions is given")
    if args.runs and not args.shards:  # every run records the shards it trained on
        from cxr.inference import run_shards

        args.shards = run_shards(args.runs[0])
        print(f"shards: {args.shards} (data.shards of {args.runs[0]}; --shards to choose)", file=sys.stderr)
    if args.bootstrap < 0 or not 0 < args.alpha < 1:
        p.error("--bootstrap must be >= 0 and --alpha in (0, 1)")
    if args.ood and not args.shards:
        p.error("--ood needs --shards (the gate scores the split's images)")


def _summary_line(result: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    scores, aucs = result["scores"], result["analysis"].aucs
    mean = aucs[aucs["label"] == "mean"].set_index("member")
    focus = ENSEMBLE if ENSEMBLE in mean.index else mean.index[-1]
    row = mean.loc[focus]
    ci = f" [{row.ci_low:.3f}, {row.ci_high:.3f}]" if np.isfinite(row.ci_low) else ""
    n_members = len([m for m in scores.scores if m != ENSEMBLE])
    where = f" on {result['ranks']} rank(s)" if result.get("ranks") else " from saved predictions"
    return (f"evaluated {n_members} member(s) on {scores.n} images of '{args.split}'{where} in {elapsed:.1f} s "
            f"({scores.n * n_members / max(elapsed, 1e-9):.0f} member-images/s); "
            f"{focus} mean AUROC {row.auroc:.3f}{ci}")


@cli_entry  # also tears down the launcher's process group on every exit path (cxrbase.errors)
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    start = time.perf_counter()
    if args.from_predictions:
        per_split, infos = load_saved(args)
        source = f"predictions {args.from_predictions}"
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        state = process_state(args)
        per_split, infos = infer_runs(args, state, _splits_needed(args))
        if per_split is None:  # not rank 0: rank 0 writes everything
            return 0
        source = f"runs {' '.join(map(str, args.runs))}; shards {args.shards}"
    result = analyse_and_write(args, per_split, infos, source)
    result["ranks"] = None if args.from_predictions else state.num_processes
    from cxr.report import format_stdout_table

    print(format_stdout_table(result["analysis"].aucs))
    print(_summary_line(result, args, time.perf_counter() - start))
    if args.ood:
        from cxr.ood import report_ood

        print(report_ood(args.ood, args.shards, args.split, result["scores"], Path(args.out)))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
