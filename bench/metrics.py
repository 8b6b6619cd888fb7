"""Bootstrap AUROC CIs at NIH test size: cxr.evaluation.stats.bootstrap_auroc vs a plain sklearn loop.

Labels are the real official test split (25,596 x 14) when the NIH CSV is found,
else random labels at its prevalence; scores are random float32 probabilities of
5 "members" plus their mean (the ensemble): 6 score sets, as the evaluator sees.
The vectorised bootstrap runs all resamples of all score sets; the sklearn loop
(``roc_auc_score`` on each resample's rows, per label) runs only the first
``--loop-resamples`` resamples of one score set and is extrapolated linearly to
n_boot x score sets. Both use the same resamples and must agree to 1e-12.

    python bench/metrics.py [--n-boot 1000] [--loop-resamples 20] [--append bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr.evaluation import stats
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import cli_entry
from cxrbase.labels import LABELS

# Per-label prevalence of the official test split (measured from Data_Entry_2017_v2020).
TEST_PREVALENCE = np.array(
    [0.1281, 0.0418, 0.0709, 0.0361, 0.182, 0.0427, 0.017, 0.0034, 0.2388, 0.0683, 0.0634, 0.0447, 0.0217, 0.1041]
)
N_TEST = 25_596
SECTION = "## metrics"


def test_labels(nih: Path, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """[25596, 14] labels of the official test split, or random ones at its prevalence."""
    csv, split = nih / "Data_Entry_2017_v2020.csv.gz", nih / "test_list.txt.gz"
    if csv.exists() and split.exists():
        with gzip.open(split, "rt") as fh:
            test = {line.strip() for line in fh if line.strip()}
        table = pd.read_csv(csv, usecols=["Image Index", "Finding Labels"])
        findings = table.loc[table["Image Index"].isin(test), "Finding Labels"].str.split("|")
        y = np.array([[name in f for name in LABELS] for f in findings], dtype=bool)
        return y, f"real official test labels from {csv}"
    return rng.random((N_TEST, len(LABELS))) < TEST_PREVALENCE, "random labels at test prevalence"


def member_scores(y: np.ndarray, n_members: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Float32 probabilities of n correlated members (AUROC ~0.7-0.85) and their mean."""
    shared = rng.normal(size=y.shape) + rng.uniform(0.7, 1.4, size=y.shape[1]) * y - 2.0
    members = []
    for _ in range(n_members):
        logits = shared + 0.5 * rng.normal(size=y.shape)
        members.append((1 / (1 + np.exp(-logits))).astype(np.float32))
    return members + [np.mean(members, axis=0, dtype=np.float32)]


def sklearn_loop(y: np.ndarray, s: np.ndarray, counts: np.ndarray, n_resamples: int) -> np.ndarray:
    """The plain reference: materialise each resample's rows, roc_auc_score per label."""
    out = np.empty((n_resamples, y.shape[1]))
    for b in range(n_resamples):
        rows = np.repeat(np.arange(y.shape[0]), counts[:, b].astype(np.int64))
        for c in range(y.shape[1]):
            out[b, c] = roc_auc_score(y[rows, c], s[rows, c])
    return out


def append_results(path: Path, block: str) -> None:
    """Replace (or add) this benchmark's section of RESULTS.md, leaving others' sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)


def measure(y: np.ndarray, score_sets: list[np.ndarray], n_boot: int, loop_resamples: int, source: str) -> list[str]:
    """Time both bootstraps side by side, check they agree, return the report lines."""
    t0 = time.perf_counter()
    counts = stats.bootstrap_counts(y.shape[0], n_boot, seed=0)
    t_counts = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    results = stats.bootstrap_auroc(y, score_sets, counts=counts)
    t_fast, cpu_fast = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    delong = [stats.delong_auroc_variance(y, s) for s in score_sets]
    t_delong = time.perf_counter() - t0

    k = min(loop_resamples, n_boot)
    t0 = time.perf_counter()
    reference = sklearn_loop(y, score_sets[0], counts, k)
    t_loop = time.perf_counter() - t0
    max_diff = float(np.max(np.abs(reference - results[0]["samples"][:k])))
    assert max_diff < 1e-12, f"bootstrap differs from sklearn by {max_diff}"

    n_sets = len(score_sets)
    loop_total = t_loop / k * n_boot * n_sets
    fast_total = t_counts + t_fast
    ens = results[-1]
    return [
        f"{y.shape[0]} images x {y.shape[1]} labels ({source}), {n_boot} resamples, {n_sets} score sets",
        f"vectorised: counts {t_counts:.2f} s once + {t_fast:.2f} s for {n_sets} sets "
        f"= {t_fast / n_sets:.2f} s per score set (CPU time {cpu_fast / n_sets:.2f} s); "
        f"total {fast_total:.2f} s",
        f"sklearn loop: {t_loop:.2f} s for {k} resamples x 1 set -> extrapolated {loop_total:.0f} s "
        f"for {n_boot} x {n_sets} ({t_loop / k * n_boot:.1f} s per score set)",
        f"speed-up {loop_total / fast_total:.0f}x (goal >= 20x); max |diff| on the {k} common resamples {max_diff:.1e}",
        f"DeLong variance: {t_delong:.2f} s for {n_sets} sets; ensemble mean AUROC {ens['mean_auroc']:.4f} "
        f"[{ens['mean_ci_low']:.4f}, {ens['mean_ci_high']:.4f}], Hernia SE bootstrap "
        f"{ens['std'][7]:.4f} vs DeLong {np.sqrt(delong[-1][7]):.4f}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--members", type=int, default=5, help="ensemble members; +1 ensemble score set")
    parser.add_argument(
        "--loop-resamples",
        type=int,
        default=20,
        help="resamples the sklearn loop runs before extrapolating (default 20)",
    )
    parser.add_argument(
        "--nih",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/nih",
        help="folder with Data_Entry_2017_v2020.csv.gz and test_list.txt.gz",
    )
    parser.add_argument("--append", type=Path, default=None, help="write the results section to this RESULTS.md")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    y, source = test_labels(args.nih, rng)
    lines = measure(y, member_scores(y, args.members, rng), args.n_boot, args.loop_resamples, source)
    print("\n".join(lines))
    if args.append:
        command = "python bench/metrics.py " + " ".join(argv if argv is not None else sys.argv[1:])
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        block = (
            f"{SECTION}\n\n`{command.strip()}` ({platform.machine()}, {os.cpu_count()} cores, "
            f"load average {load} — shared machine, so wall times are inflated; CPU time is the "
            f"process's own, {time.strftime('%Y-%m-%d')})\n\n```\n" + "\n".join(lines) + "\n```\n\n"
        )
        append_results(args.append, block)
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
