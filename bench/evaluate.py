"""Benchmark: the full `python -m cxr.evaluate --from-predictions` analysis at NIH test scale.

25,596 test images × 14 labels × 5 members (+ the ensemble) with 1,000 bootstrap
resamples, and a 10 %-of-train_val-sized val split for the tuned thresholds and the
calibration maps. When the NIH CSV is at hand the labels, patients, ages, sexes, views and
follow-up numbers are the real ones of the official test list (and of 8,652 train_val images,
whole patients, for val) and the analysis runs as the evaluator runs it on NIH shards:
patient-level bootstrap, calibration, operating points with intervals, and the default
subgroups (sex, age bands, view, follow-up); otherwise labels are drawn at a flat
prevalence and there are no patients. Scores are synthetic (correlated members, AUROC ≈ 0.8).
Times the analysis without figures (the goal: ≤ 10 s on 2 cores), the same with image-level
resampling (and how much wider the patient-level CIs are), the figures separately, and,
side by side, a scikit-learn per-resample bootstrap measured on a few resamples and
extrapolated to the same 1,000 × 14 × 6 work.

    .venv/bin/python bench/evaluate.py [--members 5] [--bootstrap 1000] [--workdir build/bench-evaluate]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.evaluate import main as evaluate_main  # noqa: E402
from cxr.evaluation.inference import with_ensemble  # noqa: E402
from cxr.evaluation.predictions import write_predictions  # noqa: E402
from cxr.evaluation.scores import ScoreSet  # noqa: E402
from cxrbase.labels import LABELS  # noqa: E402

NIH = Path(os.environ.get("CXR_NIH", ROOT.parent / "shared" / "data" / "nih"))
N_TEST, N_VAL = 25_596, 8_652


def nih_splits() -> tuple[dict[str, tuple[np.ndarray, np.ndarray, Any]], str]:
    """{"test": (keys, labels [N, 14], meta), "val": …} from the real CSV (official test list; val = whole
    train_val patients up to N_VAL images), or flat-prevalence labels without meta."""
    csv = NIH / "Data_Entry_2017_v2020.csv.gz"
    if not csv.is_file():
        rng = np.random.default_rng(0)
        return {
            split: (
                np.array([f"{i}{j:07d}_000" for j in range(n)], dtype=object),
                (rng.random((n, len(LABELS))) < 0.07).astype(np.uint8),
                None,
            )
            for i, (split, n) in enumerate((("test", N_TEST), ("val", N_VAL)), 1)
        }, "flat 7 % (NIH CSV not found)"
    import pandas as pd

    frame = pd.read_csv(
        csv,
        usecols=[
            "Image Index",
            "Finding Labels",
            "Patient ID",
            "Patient Age",
            "Patient Gender",
            "View Position",
            "Follow-up #",
        ],
    )
    test = set(gzip.open(NIH / "test_list.txt.gz", "rt").read().split())
    findings = frame["Finding Labels"].str.split("|")
    onehot = np.array([[label in f for label in LABELS] for f in findings], dtype=np.uint8)
    meta = pd.DataFrame(
        {
            "patient": frame["Patient ID"],
            "age": frame["Patient Age"],
            "sex": frame["Patient Gender"],
            "view": frame["View Position"],
            "followup": frame["Follow-up #"],
        }
    )
    in_test = frame["Image Index"].isin(test).to_numpy()
    rng = np.random.default_rng(0)
    rest = frame.loc[~in_test, "Patient ID"]
    patients = rng.permutation(rest.unique())
    sizes = rest.value_counts().reindex(patients).to_numpy()
    chosen = set(patients[: int(np.searchsorted(np.cumsum(sizes), N_VAL)) + 1])
    in_val = (~in_test) & frame["Patient ID"].isin(chosen).to_numpy()
    out = {}
    for split, mask in (("test", in_test), ("val", in_val)):
        keys = frame.loc[mask, "Image Index"].str.removesuffix(".png").to_numpy(dtype=object)
        out[split] = (keys, onehot[mask], meta[mask].reset_index(drop=True))
    return out, f"real NIH labels, patients, age, sex, view, follow-up ({csv.name}, official test list)"


def synthetic_scores(keys: np.ndarray, y: np.ndarray, meta, members: int, seed: int) -> ScoreSet:
    """Correlated member probabilities for real labels: shared image effect + member noise + label signal."""
    rng = np.random.default_rng(seed)
    prevalence = y.mean(axis=0).clip(1e-3, None)
    shared = rng.normal(size=y.shape)
    base = np.log(prevalence / (1 - prevalence))
    scores = {}
    for m in range(members):
        logit = base + 1.2 * y + 0.8 * shared + 0.6 * rng.normal(size=shared.shape)
        # float32 model outputs, as inference writes them (ties appear as in real data)
        scores[f"member{m + 1}"] = (1 / (1 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    return ScoreSet(keys=keys, y_true=y, scores=scores, meta=meta)


def sklearn_bootstrap_seconds(scores: ScoreSet, n_boot: int, probe: int = 5) -> float:
    """Extrapolated time of a per-resample sklearn roc_auc_score loop doing the same work."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    sets = list(scores.scores.values())
    t0 = time.perf_counter()
    for _ in range(probe):
        idx = rng.integers(0, scores.n, scores.n)
        for s in sets:
            for c in range(len(LABELS)):
                roc_auc_score(scores.y_true[idx, c], s[idx, c])
    return (time.perf_counter() - t0) / probe * n_boot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--workdir", default=str(ROOT / "build" / "bench-evaluate"))
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    splits, source = nih_splits()
    per_split = {
        split: with_ensemble(synthetic_scores(*splits[split], args.members, seed), "mean-prob")
        for seed, split in enumerate(("test", "val"), 1)
    }
    predictions = work / "predictions.parquet"
    write_predictions(work, per_split)
    test = per_split["test"]
    units = f", {test.meta['patient'].nunique()} patients" if test.meta is not None else ""
    print(
        f"predictions: {test.n} test{units} + {per_split['val'].n} val images × {len(LABELS)} labels × "
        f"{args.members} members + ensemble; {source}; cpu count {os.cpu_count()}"
    )

    common = ["--from-predictions", str(predictions), "--bootstrap", str(args.bootstrap)]
    load_before = os.getloadavg()[0]
    analysis_s, analysis_cpu = timed(
        lambda: evaluate_main([*common, "--out", str(work / "report-nofig"), "--no-figures"])
    )
    image_s, image_cpu = timed(
        lambda: evaluate_main([*common, "--out", str(work / "report-image"), "--no-figures", "--resample", "image"])
    )
    full_s, full_cpu = timed(lambda: evaluate_main([*common, "--out", str(work / "report")]))
    load_after = os.getloadavg()[0]
    widths = ci_widths(work / "report-nofig", work / "report-image")
    sk_s = sklearn_bootstrap_seconds(per_split["test"], args.bootstrap)

    print()
    print(
        f"load average before: {load_before:.1f} on {os.cpu_count()} cores (wall time includes waiting for "
        "other processes; CPU time is this process's user+sys over all its threads)"
    )
    print(
        f"analysis (--from-predictions, no figures): wall {analysis_s:6.2f} s, CPU {analysis_cpu:6.2f} s  "
        f"(goal ≤ 10 s: {'met' if analysis_s <= 10 else 'missed'} by wall, "
        f"{'met' if analysis_cpu <= 10 else 'missed'} by CPU)"
    )
    print(f"same, --resample image (no figures):       wall {image_s:6.2f} s, CPU {image_cpu:6.2f} s")
    print(
        f"with figures roc + pr + reliability:       wall {full_s:6.2f} s, CPU {full_cpu:6.2f} s  "
        f"(figures ≈ {full_cpu - analysis_cpu:.2f} s CPU); load average after: {load_after:.1f}"
    )
    print(
        f"ensemble AUROC CI width, patient / image resampling: mean row {widths['mean']:.2f}×, "
        f"labels median {widths['median']:.2f}× (range {widths['min']:.2f}–{widths['max']:.2f}×)"
    )
    print(
        f"sklearn per-resample bootstrap (extrap.):  wall {sk_s:6.1f} s  → the whole analysis is "
        f"{sk_s / analysis_s:.0f}× faster than its bootstrap alone"
    )


def ci_widths(patient: Path, image: Path) -> dict[str, float]:
    """How much wider the ensemble's AUROC CIs are with patient-level than with image-level resampling."""
    import pandas as pd

    def width(report: Path) -> Any:
        aucs = pd.read_csv(report / "aucs.csv").query("member == 'ensemble'").set_index("label")
        return aucs["ci_high"] - aucs["ci_low"]

    ratio = width(patient) / width(image)
    labels = ratio.drop("mean")
    return {
        "mean": float(ratio["mean"]),
        "median": float(labels.median()),
        "min": float(labels.min()),
        "max": float(labels.max()),
    }


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
