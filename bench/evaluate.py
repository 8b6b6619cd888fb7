"""Benchmark: the full `python -m cxr.evaluate --from-predictions` analysis at NIH test scale.

25,596 test images × 14 labels × 5 members (+ the ensemble) with 1,000 bootstrap
resamples, and a 10 %-of-train_val-sized val split for the tuned thresholds. Scores
are synthetic (correlated members, AUROC ≈ 0.8) with labels drawn at the real
per-label prevalence of the official test / train_val lists when the NIH CSV is at
hand. Times the analysis without figures (the goal: ≤ 10 s on 2 cores), the figures
separately, and, side by side, a scikit-learn per-resample bootstrap measured on a
few resamples and extrapolated to the same 1,000 × 14 × 6 work.

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.evaluate import main as evaluate_main  # noqa: E402
from cxr.inference import with_ensemble  # noqa: E402
from cxr.predictions import write_predictions  # noqa: E402
from cxr.report import ScoreSet  # noqa: E402
from cxrbase.labels import LABELS  # noqa: E402

NIH = Path(os.environ.get("CXR_NIH", ROOT.parent / "shared" / "data" / "nih"))
N_TEST, N_VAL = 25_596, 8_652


def nih_prevalence() -> tuple[np.ndarray, np.ndarray, str]:
    """Per-label prevalence of the official test list and of train_val (from the real CSV)."""
    csv = NIH / "Data_Entry_2017_v2020.csv.gz"
    if not csv.is_file():
        flat = np.full(len(LABELS), 0.07)
        return flat, flat / 1.6, "flat 7 % (NIH CSV not found)"
    import pandas as pd

    frame = pd.read_csv(csv, usecols=["Image Index", "Finding Labels"])
    test = set(gzip.open(NIH / "test_list.txt.gz", "rt").read().split())
    labels = frame["Finding Labels"].str.split("|")
    onehot = np.array([[label in findings for label in LABELS] for findings in labels], dtype=float)
    in_test = frame["Image Index"].isin(test).to_numpy()
    return onehot[in_test].mean(0), onehot[~in_test].mean(0), f"real NIH prevalence ({csv.name})"


def synthetic_scores(n: int, prevalence: np.ndarray, members: int, seed: int, prefix: str) -> ScoreSet:
    """Correlated member probabilities: shared image effect + member noise + label signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < prevalence).astype(np.uint8)
    shared = rng.normal(size=(n, len(LABELS)))
    base = np.log(prevalence / (1 - prevalence))
    scores = {}
    for m in range(members):
        logit = base + 1.2 * y + 0.8 * shared + 0.6 * rng.normal(size=shared.shape)
        # float32 model outputs, as inference writes them (ties appear as in real data)
        scores[f"member{m + 1}"] = (1 / (1 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    keys = np.array([f"{prefix}{i:07d}_000" for i in range(n)], dtype=object)
    return ScoreSet(keys=keys, y_true=y, scores=scores)


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
    test_prev, val_prev, source = nih_prevalence()
    per_split = {"test": synthetic_scores(N_TEST, test_prev, args.members, 1, "1"),
                 "val": synthetic_scores(N_VAL, val_prev, args.members, 2, "2")}
    per_split = {k: with_ensemble(v, "mean-prob") for k, v in per_split.items()}
    predictions = work / "predictions.parquet"
    write_predictions(work, per_split)
    print(f"predictions: {N_TEST} test + {N_VAL} val images × {len(LABELS)} labels × "
          f"{args.members} members + ensemble; labels at {source}; cpu count {os.cpu_count()}")

    common = ["--from-predictions", str(predictions), "--bootstrap", str(args.bootstrap)]
    load_before = os.getloadavg()[0]
    analysis_s, analysis_cpu = timed(lambda: evaluate_main([*common, "--out", str(work / "report-nofig"),
                                                            "--no-figures"]))
    full_s, full_cpu = timed(lambda: evaluate_main([*common, "--out", str(work / "report")]))
    sk_s = sklearn_bootstrap_seconds(per_split["test"], args.bootstrap)

    print()
    print(f"load average before: {load_before:.1f} on {os.cpu_count()} cores (wall time includes waiting for "
          "other processes; CPU time is this process's user+sys over all its threads)")
    print(f"analysis (--from-predictions, no figures): wall {analysis_s:6.2f} s, CPU {analysis_cpu:6.2f} s  "
          f"(goal ≤ 10 s: {'met' if analysis_s <= 10 else 'missed'} by wall, "
          f"{'met' if analysis_cpu <= 10 else 'missed'} by CPU)")
    print(f"with figures roc.png + pr.png:             wall {full_s:6.2f} s, CPU {full_cpu:6.2f} s  "
          f"(figures ≈ {full_cpu - analysis_cpu:.2f} s CPU)")
    print(f"sklearn per-resample bootstrap (extrap.):  wall {sk_s:6.1f} s  → the whole analysis is "
          f"{sk_s / analysis_s:.0f}× faster than its bootstrap alone")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
