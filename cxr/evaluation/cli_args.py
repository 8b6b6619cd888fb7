"""The command line of `python -m cxr.evaluate` (cxr/evaluate.py): its parser, built in groups of options."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.evaluate",
        description="Evaluate trained runs (an ensemble of members) on a split of packed shards: "
        "per-label AUROC with bootstrap CIs, AUPRC, tuned thresholds, threshold metrics, ROC/PR "
        "figures and report.md. Never trains. Under `accelerate launch` each rank infers a "
        "disjoint part of the split and rank 0 writes the report.",
        epilog="Writes OUT/{predictions.parquet, members.json, aucs.csv, thresholds.json, metrics.csv, "
        "calibration.csv, calibration.json, subgroups.csv, roc.png, pr.png, reliability.png, report.md}, "
        "replacing an earlier report there as a whole; a second evaluation into the same --out is refused "
        "while one runs. SIGTERM/SIGUSR1 stop it with nothing written and exit 75 (requeue). Examples:\n"
        "  python -m cxr.evaluate --runs runs/m1 runs/m2 --shards shards --split test --out report\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m cxr.evaluate --runs ... --out report\n"
        "  python -m cxr.evaluate --from-predictions report/predictions.parquet --out report2\n"
        "--debug shows the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sources(p)
    _add_analysis(p)
    _add_inference(p)
    _add_report(p)
    return p


def _add_sources(p: argparse.ArgumentParser) -> None:
    """What is evaluated and where the report goes: runs, shards, split, --out, threshold split."""
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN",
        help="training run dirs (config.yaml + checkpoints/best); each is one member",
    )
    p.add_argument(
        "--shards",
        help="shards folder with manifest.json (python -m shards pack), or its URL (s3://…, https://…); "
        "default: the first run's data.shards",
    )
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument(
        "--thresholds-from",
        default="val",
        help="split on which F1/Youden thresholds are tuned (inferred too); 'none': 0.5 only (default: val)",
    )


def _add_analysis(p: argparse.ArgumentParser) -> None:
    """The bootstrap, the ensemble rule and --from-predictions."""
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC CIs; 0: no CIs (default: 1000)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    p.add_argument(
        "--ensemble",
        choices=["mean-prob", "mean-logit"],
        default="mean-prob",
        help="ensemble = mean of member probabilities (default), or sigmoid of their mean logit",
    )
    p.add_argument(
        "--from-predictions",
        metavar="FILE",
        help="recompute every output from a saved predictions.parquet (no models, no shards)",
    )


def _add_inference(p: argparse.ArgumentParser) -> None:
    """How members are inferred: resolution, batch, loader, precision, device, threads."""
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="evaluate every member at R×R even if trained at other resolutions "
        "(default: members must share one training resolution, else refused)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch per rank (default: the first member's data.eval_batch_size / batch_size)",
    )
    p.add_argument(
        "--backend",
        choices=["dali", "wds"],
        default=None,
        help="loader back end (default: the first member's data.backend)",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="loader threads/workers per rank (default: the first member's data.num_threads)",
    )
    p.add_argument(
        "--loader-device",
        choices=["cpu", "gpu"],
        default=None,
        help="where the loader decodes (default: the first member's data.device)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast dtype of the forward pass; bf16/fp16 for GPUs (default: fp32)",
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per process (default: torch's choice; 1 on shared CPUs)",
    )


def _add_report(p: argparse.ArgumentParser) -> None:
    """What the report holds: figures, bootstrap unit, subgroups, calibration, cross-site, OOD gate."""
    p.add_argument("--no-figures", action="store_true", help="skip roc.png / pr.png / reliability.png")
    p.add_argument(
        "--resample",
        choices=["patient", "image"],
        default="patient",
        help="bootstrap unit: whole patients when the split's table gives them (default), or images",
    )
    p.add_argument(
        "--subgroups",
        nargs="*",
        metavar="GROUPING",
        default=None,
        help="groupings for the subgroup section: columns of the splits table (sex, view, followup, or "
        'any column; NIH headers such as "Patient Gender" work) or age:20,40,60,80 bands '
        "(default: sex age:20,40,60,80 view followup, those the split has; none: no subgroups)",
    )
    p.add_argument(
        "--splits",
        metavar="TABLE",
        help="splits table (python -m shards split) giving each image's "
        "patient, age, sex, view (default: the table the shards were packed from, or with "
        "--from-predictions the columns saved in predictions.parquet)",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip the calibration section (ECE, Brier, temperature/Platt fitted on --thresholds-from)",
    )
    p.add_argument(
        "--compare-to",
        metavar="REPORT",
        help="an earlier report folder (or its aucs.csv), e.g. the same runs on their own data set's test "
        "split: report.md and cross_site.csv put its (internal) AUROCs beside this evaluation's (external) "
        "ones, paired by label, with delta = external − internal. Runs scored on another data set's shards "
        "are evaluated on the labels both share by name; the others are dropped and named with the reason",
    )
    p.add_argument(
        "--ood",
        metavar="RUN",
        help="an ood_ae run (cxr/tools/ood.py): reject the split's images the gate "
        "rejects and report mean AUROC on the accepted ones beside all (OUT/ood.csv; needs --shards)",
    )
