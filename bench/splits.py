"""Stratified split quality and speed on the real NIH CSV: greedy vs iterstrat vs random.

Prints, for 90/5/5 patient-level splits over several seeds, the mean and max per-label
prevalence spread (max − min across splits, percentage points) and the time of each
method, measured side by side in one run; plus synth throughput at 256 px.

    python bench/splits.py [--metadata CSV] [--seeds 3] [--synth-n 200] [--append bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.metadata import read_metadata  # noqa: E402
from shards.splits import SPLITS, build_table, greedy_assign, iterstrat_assign, patient_counts, random_assign  # noqa: E402
from shards.stats import label_spread  # noqa: E402
from shards.synth import LabelSampler, _write_one, plan_cases  # noqa: E402


def measure(meta, ids, counts, method: str, seed: int) -> tuple[float, float, float]:
    """(mean spread pp, max spread pp, CPU seconds) of one method and seed."""
    fractions = np.array([0.9, 0.05, 0.05])
    start = time.process_time()
    if method == "greedy":
        per_patient = greedy_assign(counts, fractions, seed)
    elif method == "iterstrat":
        per_patient = iterstrat_assign(counts, fractions, seed)
    else:
        per_patient = random_assign(ids.size, fractions, seed)
    took = time.process_time() - start
    split = np.asarray(SPLITS, dtype=object)[per_patient[np.searchsorted(ids, meta["patient"].to_numpy())]]
    spread = label_spread(build_table(meta, split))
    return float(spread.mean()), float(spread.max()), took


def synth_rate(n: int) -> float:
    """Phantoms per CPU second at 256 px (render + PNG encode + write), one process."""
    cases = plan_cases(n, 0, LabelSampler(None))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        for case in cases:
            _write_one((case, 0, 256, tmp))
        return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", default=str(ROOT.parent / "shared/data/nih/Data_Entry_2017_v2020.csv.gz"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--synth-n", type=int, default=200)
    parser.add_argument("--append", default=None, help="append the result table to this markdown file")
    args = parser.parse_args()
    meta = read_metadata(args.metadata)
    ids, counts = patient_counts(meta)
    lines = [
        f"{len(meta):,} images, {ids.size:,} patients, fractions 0.9/0.05/0.05, seeds 0..{args.seeds - 1}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
        "| method | mean spread pp | max spread pp | CPU s per split | mean spread ÷ random |",
        "|---|---|---|---|---|",
    ]
    results = {
        m: np.array([measure(meta, ids, counts, m, s) for s in range(args.seeds)])
        for m in ("random", "iterstrat", "greedy")
    }
    base = results["random"][:, 0].mean()
    for method, r in results.items():
        lines.append(
            f"| {method} | {r[:, 0].mean():.3f} | {r[:, 1].mean():.3f} | {r[:, 2].mean():.2f} | "
            f"{r[:, 0].mean() / base:.3f} |"
        )
    lines += [
        "",
        f"synth: {synth_rate(args.synth_n):.0f} phantoms per CPU second at 256 px "
        f"({args.synth_n} images, one process, render + PNG + atomic write)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(args.append, "a") as fh:
            fh.write(
                f"\n## splits and synth\n\n### {stamp} — `python bench/splits.py --append bench/RESULTS.md`\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
