"""`python -m cxr.tools.ablation report` — compare the runs of a sweep on the same test images.

    python -m cxr.tools.ablation report --runs RUN [RUN ...] --out DIR [--shards DIR] [--split test]
                                  [--by data.resolution] [--reference R] [--bootstrap 1000]
    python -m cxr.tools.ablation report --from-predictions DIR/predictions.parquet --runs RUN ... --out DIR2

The question it answers: what does a setting (by default the training resolution)
buy, per label, and is the difference real? Each run is inferred on the split with
``cxr.evaluate``'s inference (each member at its own training resolution: one pass
over the split per distinct resolution), then, on those predictions:

- per variant (a value of ``--by``; the runs sharing it are its seeds) and label:
  test AUROC with a 95 % percentile-bootstrap CI; with several seeds the variant is
  scored by the mean of its seeds' probabilities (a seed ensemble) and the table adds
  the mean ± sd across seeds of the single runs' AUROCs next to the CI;
- "ensemble of all": the mean probability over every run of the sweep;
- per variant and label, the difference against the reference variant (default: the
  lowest): ΔAUROC, a paired bootstrap CI (images resampled once per replicate, shared
  by both), DeLong's paired test (z, p) and the Holm-adjusted p across the labels,
  ``significant`` when the adjusted p < alpha;
- per run: training images/s, seconds per epoch, peak memory (throughput.csv), the
  micro-batch × accumulation and activation checkpointing (config.yaml).

Writes DIR/ablation.md, ablation.csv (variant × label), runs.csv (per run),
predictions.parquet (cxr.evaluation.predictions' format: re-analyse with --from-predictions),
auroc_vs_<key>.png (one panel per label, the mean first) and delta_vs_<ref>.png.
The statistics live in ``cxr.evaluation.metrics`` (paired_delong, paired_bootstrap_delta, holm).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import Config, config_to_dict
from cxr.evaluation.scores import MEAN, ScoreSet
from cxr.tools.ablation_report import ALL, plot_auroc, plot_delta, report_markdown, run_costs
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from cxrbase.labels import LABELS

DEFAULT_BY = "data.resolution"


# ------------------------------------------------------------------ the sweep's runs ----


@dataclass
class Run:
    """One run of the sweep: its member name in the predictions, its variant and seed."""

    name: str
    run_dir: Path
    variant: Any
    seed: Any
    config: Config


def config_value(config: Config, key: str) -> Any:
    """The value of ``a.b`` in the run's config (as written in config.yaml; None when no such key)."""
    node: Any = config_to_dict(config)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_runs(run_dirs: Sequence[str | Path], by: Sequence[str]) -> list[Run]:
    """The runs' configs and their variant (the values of ``by``) and seed."""
    from cxr.evaluation.inference import member_names

    runs = []
    for run_dir, name in zip(run_dirs, member_names(run_dirs)):
        config = Config.load(run_dir)
        values = [config_value(config, key) for key in by]
        missing = [k for k, v in zip(by, values) if v is None]
        if missing:
            raise CxrError(f"{run_dir}/config.yaml: no {missing[0]} — --by names config keys every run has")
        variant = values[0] if len(values) == 1 else ",".join(f"{k}={v}" for k, v in zip(by, values))
        runs.append(Run(name, Path(run_dir), variant, config_value(config, "train.seed"), config))
    return runs


def variant_order(runs: Sequence[Run]) -> list[Any]:
    """Variants in ascending order (numbers numerically, else as first seen)."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in variants):
        return sorted(variants)
    return variants


# ------------------------------------------------------------------ the analysis ----


def variant_scores(scores: ScoreSet, runs: Sequence[Run], order: Sequence[Any]) -> ScoreSet:
    """Score sets per variant (mean probability of its seeds) and the ensemble of all runs."""
    by_variant = {}
    for v in order:
        members = [scores.scores[r.name] for r in runs if r.variant == v]
        by_variant[str(v)] = np.mean(members, axis=0)
    by_variant[ALL] = np.mean([scores.scores[r.name] for r in runs], axis=0)
    return ScoreSet(keys=scores.keys, y_true=scores.y_true, scores=by_variant, labels=scores.labels, meta=scores.meta)


def calibration_and_gaps(scores: ScoreSet) -> pd.DataFrame:
    """Per variant and label (+ mean): raw ECE (equal width, equal mass) and Brier (cxr.evaluation.calibration),
    and per default subgroup grouping the split has (cxr.evaluation.subgroups) the AUROC gap ``gap_<grouping>``:
    the other group − the largest one for two groups, the highest − the lowest group for more.
    Point estimates; the evaluator's report gives their CIs and tests."""
    from cxr.evaluation import calibration as cal
    from cxr.evaluation.metrics import per_label_auroc
    from cxr.evaluation.subgroups import ALIASES, DEFAULT_GROUPINGS, grouping_column

    groupings = []
    if scores.meta is not None:
        for spec in DEFAULT_GROUPINGS:
            if ALIASES.get(spec.split(":")[0], spec.split(":")[0]) in scores.meta:
                name, groups = grouping_column(spec, scores.meta)
                names = sorted(pd.unique(groups[groups.notna()]), key=lambda g: -int((groups == g).sum()))
                if len(names) >= 2:
                    groupings.append((name, [(groups == g).to_numpy() for g in names]))
    y, rows = scores.y_true, []
    for variant, p in scores.scores.items():
        values = {
            "ece_width": cal.ece(y, p, strategy="width"),
            "ece_mass": cal.ece(y, p, strategy="mass"),
            "brier": cal.brier(y, p),
        }
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a group without positives: NaN
            for name, masks in groupings:
                aucs = np.array([per_label_auroc(y[m], p[m]) for m in masks])  # [groups, L]
                values[f"gap_{name.replace(' ', '_')}"] = (
                    aucs[1] - aucs[0] if len(masks) == 2 else np.nanmax(aucs, 0) - np.nanmin(aucs, 0)
                )
        for c, label in enumerate([*scores.labels, MEAN]):
            rows.append(
                {
                    "variant": variant,
                    "label": label,
                    **{
                        k: float(v[c]) if label != MEAN else float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
                        for k, v in values.items()
                    },
                }
            )
    return pd.DataFrame(rows)


def _seed_spread(run_aucs: pd.DataFrame, runs: Sequence[Run]) -> pd.DataFrame:
    """Mean ± sd (ddof 1) across a variant's seeds of the single runs' AUROCs."""
    variant_of = {r.name: str(r.variant) for r in runs}
    frame = run_aucs.assign(variant=run_aucs["member"].map(variant_of))
    grouped = frame.groupby(["variant", "label"], sort=False)["auroc"]
    return pd.DataFrame(
        {"seeds": grouped.size(), "seeds_mean": grouped.mean(), "seeds_sd": grouped.std(ddof=1)}
    ).reset_index()


def compare(
    y: np.ndarray,
    score: np.ndarray,
    reference: np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float,
    labels: Sequence[str] = LABELS,
) -> pd.DataFrame:
    """Per label (+ mean): ΔAUROC vs the reference, paired bootstrap CI, DeLong z/p, Holm p."""
    from cxr.evaluation.stats import bootstrap_counts, holm, paired_bootstrap_delta, paired_delong

    tests = [paired_delong(y[:, c], score[:, c], reference[:, c]) for c in range(y.shape[1])]
    p = np.array([t["p"] for t in tests])
    p_holm = holm(p)
    if n_boot > 0:
        # The same seed for every variant: all comparisons share one set of resamples.
        boot = paired_bootstrap_delta(y, score, reference, alpha=alpha, counts=bootstrap_counts(len(y), n_boot, seed))
    else:
        nan = np.full(y.shape[1], np.nan)
        boot = {"ci_low": nan, "ci_high": nan, "mean_ci_low": np.nan, "mean_ci_high": np.nan}
    rows = []
    for c, label in enumerate(labels):  # the shards' label names (any data set's)
        rows.append(
            {
                "label": label,
                "delta": tests[c]["delta"],
                "delta_ci_low": boot["ci_low"][c],
                "delta_ci_high": boot["ci_high"][c],
                "delong_z": tests[c]["z"],
                "p": p[c],
                "p_holm": p_holm[c],
                "significant": bool(p_holm[c] < alpha) if np.isfinite(p_holm[c]) else False,
            }
        )
    deltas = np.array([t["delta"] for t in tests])
    rows.append(
        {
            "label": MEAN,
            "delta": float(np.nanmean(deltas)) if np.isfinite(deltas).any() else np.nan,
            "delta_ci_low": boot["mean_ci_low"],
            "delta_ci_high": boot["mean_ci_high"],
            "delong_z": np.nan,
            "p": np.nan,
            "p_holm": np.nan,
            # the mean has no DeLong test; its bootstrap CI excluding 0 is the criterion
            "significant": bool(
                np.isfinite(boot["mean_ci_low"]) and (boot["mean_ci_low"] > 0 or boot["mean_ci_high"] < 0)
            ),
        }
    )
    return pd.DataFrame(rows)


def analyse_sweep(
    scores: ScoreSet,
    runs: Sequence[Run],
    reference: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    by: str = DEFAULT_BY,
) -> dict[str, Any]:
    """Every table of the report from the runs' predictions (``scores``: one member per run)."""
    from cxr.evaluation.analysis import auc_table

    order = variant_order(runs)
    if reference is None:
        reference = order[0]
    matches = [v for v in order if str(v) == str(reference)]
    if not matches:
        raise CxrError(f"--reference {reference}: not a variant of the sweep (has {order}) — choose one of those")
    reference = matches[0]
    per_variant = variant_scores(scores, runs, order)
    variant_aucs = auc_table(per_variant, n_boot=n_boot, seed=seed, alpha=alpha, progress=False)
    run_aucs = auc_table(
        ScoreSet(scores.keys, scores.y_true, {r.name: scores.scores[r.name] for r in runs}, labels=scores.labels),
        n_boot=0,
        progress=False,
    )
    table = variant_aucs.rename(columns={"member": "variant"}).merge(
        _seed_spread(run_aucs, runs), on=["variant", "label"], how="left"
    )
    comparisons = []
    ref_score = per_variant.scores[str(reference)]
    for v in [*map(str, order), ALL]:
        if v == str(reference):
            continue
        frame = compare(scores.y_true, per_variant.scores[v], ref_score, n_boot, seed, alpha, scores.labels)
        comparisons.append(frame.assign(variant=v))
    comparison = (
        pd.concat(comparisons, ignore_index=True)
        if comparisons
        else pd.DataFrame(columns=["variant", "label", "delta"])
    )
    table = table.merge(comparison, on=["variant", "label"], how="left")
    table = table.merge(calibration_and_gaps(per_variant), on=["variant", "label"], how="left")
    table.insert(0, "by", by)
    table["reference"] = str(reference)
    return {
        "table": table,
        "run_aucs": run_aucs,
        "order": [str(v) for v in order],
        "reference": str(reference),
        "alpha": alpha,
        "n_boot": n_boot,
        "by": by,
    }


# ------------------------------------------------------------------ orchestration ----


def infer_predictions(args: argparse.Namespace) -> tuple[ScoreSet | None, list[dict[str, Any]]]:
    """The runs' predictions on ``args.split`` via cxr.evaluate (each member at its own resolution)
    and their members.json entries; None on ranks other than 0."""
    from cxr.evaluation.inference import infer_runs, process_state
    from cxr.runs.open import EvalOptions

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = EvalOptions.from_flags(args)
    state = process_state(args.cpu)
    per_split, infos = infer_runs(args.runs, opts, state, [args.split])
    if per_split is None:
        return None, infos
    return per_split[args.split], infos


def _default_shards(runs: Sequence[Run]) -> str:
    from cxr.runs.open import run_shards

    return run_shards(runs[0].run_dir)


def write_report(
    out: Path, result: dict[str, Any], costs: pd.DataFrame, context: dict[str, Any], figures: bool = True
) -> list[Path]:
    """ablation.md, ablation.csv, runs.csv and the figures, atomically; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "ablation.csv", out / "runs.csv"]
    atomic_write_text(written[0], result["table"].to_csv(index=False))
    atomic_write_text(written[1], costs.to_csv(index=False))
    if figures:
        key = result["by"].split(".")[-1]
        names = [f"auroc_vs_{key}.png", f"delta_vs_{result['reference']}.png"]
        plot_auroc(out / names[0], result)
        plot_delta(out / names[1], result)
        context["figures"] = names
        written += [out / n for n in names]
    atomic_write_text(out / "ablation.md", report_markdown(result, costs, context))
    return [out / "ablation.md", *written]


def report(args: argparse.Namespace) -> int:
    from cxr.evaluation.inference import with_ensemble
    from cxr.evaluation.predictions import read_predictions, write_predictions

    start = time.perf_counter()
    by = args.by
    runs = read_runs(args.runs, by)
    out = Path(args.out)
    if args.from_predictions:
        per_split = read_predictions(Path(args.from_predictions))
        if args.split not in per_split:
            raise CxrError(f"{args.from_predictions}: no split {args.split!r} (has {sorted(per_split)}) — pass --split")
        scores = per_split[args.split]
        missing = [r.name for r in runs if r.name not in scores.scores]
        if missing:
            raise CxrError(
                f"{args.from_predictions}: no predictions of run(s) {missing} — pass the same --runs that wrote it"
            )
        source = f"predictions {args.from_predictions}"
    else:
        args.shards = args.shards or _default_shards(runs)
        scores, infos = infer_predictions(args)
        if scores is None:  # not rank 0
            return 0
        from cxr.evaluation.subgroups import attach_meta, packed_table

        scores = attach_meta({args.split: scores}, packed_table(args.shards), strict=False)[args.split]
        write_predictions(out, {args.split: with_ensemble(scores, "mean-prob")}, infos)
        source = f"runs inferred on shards {args.shards}, each at its own training resolution"
    result = analyse_sweep(scores, runs, args.reference, args.bootstrap, args.seed, args.alpha, by=",".join(by))
    costs = run_costs(runs)
    context = {"split": args.split, "runs": len(runs), "source": source}
    paths = write_report(out, result, costs, context, figures=not args.no_figures)
    table = result["table"]
    sig = table[(table.label != MEAN) & table.significant.fillna(False).astype(bool) & (table.variant != ALL)]
    mean = table[table.label == MEAN].set_index("variant").auroc
    print("mean AUROC: " + ", ".join(f"{v} {mean[v]:.3f}" for v in [*result["order"], ALL]))
    print(
        f"ablation: {len(runs)} runs, {len(result['order'])} variants of {result['by']}, {scores.n} images; "
        f"{len(sig)} significant (label, variant) gains vs {result['reference']} in "
        f"{time.perf_counter() - start:.1f} s -> {paths[0]}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr.tools.ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "report",
        help="paired comparison report of a sweep's runs",
        description="Infer every run on --split (each at its own resolution) and write "
        "ablation.md / ablation.csv / runs.csv / figures to --out.",
    )
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="the sweep's training run dirs")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--shards", help="shards folder (default: the first run's data.shards)")
    p.add_argument("--split", default="test", help="split to compare on (default: test)")
    p.add_argument(
        "--by",
        nargs="+",
        default=[DEFAULT_BY],
        metavar="KEY",
        help=f"config key(s) whose values are the variants; runs sharing them are seeds (default: {DEFAULT_BY})",
    )
    p.add_argument("--reference", default=None, help="variant the others are compared with (default: the lowest)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples; 0: none (default 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="level of CIs and tests (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--from-predictions", metavar="FILE", help="use a saved predictions.parquet (no inference)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch per rank (default: the runs')")
    p.add_argument("--backend", choices=["dali", "wds"], default=None, help="loader back end (default: the runs')")
    p.add_argument("--num-threads", type=int, default=None, help="loader threads (default: the runs')")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="inference autocast dtype")
    p.add_argument("--cpu", action="store_true", help="infer on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 0 or not 0 < args.alpha < 1:
        raise CxrError(f"--bootstrap {args.bootstrap} / --alpha {args.alpha}: need bootstrap ≥ 0 and alpha in (0, 1)")
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
