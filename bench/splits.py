"""Stratified split quality and speed on the real NIH CSV: greedy vs iterstrat vs random.

Prints, for 90/5/5 patient-level splits over several seeds, the mean and max per-label
prevalence spread (max − min across splits, percentage points) and the time of each
method, measured side by side in one run; plus synth throughput at 256 px.

    python bench/splits.py [--metadata CSV] [--seeds 3] [--synth-n 200] [--append bench/RESULTS.md]

With ``--datasets``: instead, `cxr-shards split --dataset chexpert|mimic` (as a user runs it, one
process each, wall clock) on generated metadata of the real size in each data set's published
layout (CheXpert 223,648 rows, MIMIC-CXR-JPG 377,110 images), beside NIH's official split of the real
CSV (112,120 rows) in the same run; goal: each under 30 s on 2 cores (issue 26).

    python bench/splits.py --datasets [--append bench/RESULTS.md]
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
            _write_one((case, 0, 256, tmp, None))  # no fine-detail label
        return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", default=str(ROOT.parent / "shared/data/nih/Data_Entry_2017_v2020.csv.gz"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--synth-n", type=int, default=200)
    parser.add_argument("--append", default=None, help="append the result table to this markdown file")
    parser.add_argument("--datasets", action="store_true", help="time split on full-size CheXpert/MIMIC layouts")
    args = parser.parse_args()
    if args.datasets:
        return dataset_main(args)
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
    _append(args.append, "splits and synth", "python bench/splits.py --append bench/RESULTS.md", "\n".join(lines))


def _append(path: str | None, title: str, command: str, text: str) -> None:
    """Print the result and, with ``--append``, add it to the markdown file under a stamped heading."""
    print(text)
    if path:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(path, "a") as fh:
            fh.write(f"\n## {title}\n\n### {stamp} — `{command}`\n\n{text}\n")


CHEXPERT_FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip


def _findings(rng: np.random.Generator, n: int):
    """n rows of the 14 observations: blank 60 %, 1 20 %, 0 12 %, −1 8 % (as written by the labeler)."""
    import pandas as pd

    codes = rng.choice(np.array(["", "1.0", "0.0", "-1.0"], dtype=object), size=(n, 14), p=[0.6, 0.2, 0.12, 0.08])
    return pd.DataFrame(codes, columns=CHEXPERT_FINDINGS)


def write_chexpert_like(root: Path, n_train: int = 223_414, n_valid: int = 234, seed: int = 0) -> None:
    """CheXpert-v1.0 train.csv/valid.csv of the real size: 64,540 train patients, up to 3 views per study."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    for name, n, first, patients in (("train", n_train, 1, 64_540), ("valid", n_valid, 64_541, 200)):
        patient = np.sort(rng.integers(first, first + patients, n))
        study = np.arange(n) // 3 + 1  # three views per study, every path distinct
        view = np.arange(n) % 3 + 1
        lateral = view == 3
        side = np.where(lateral, "lateral", "frontal")
        path = [
            f"CheXpert-v1.0/{name}/patient{p:05d}/study{s}/view{v}_{f}.jpg"
            for p, s, v, f in zip(patient, study, view, side)
        ]
        frame = pd.DataFrame(
            {
                "Path": path,
                "Sex": rng.choice(["Male", "Female", "Unknown"], n, p=[0.59, 0.409, 0.001]),
                "Age": rng.integers(18, 91, n),
                "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
                "AP/PA": np.where(lateral, "", rng.choice(["AP", "PA"], n)),
            }
        )
        frame = pd.concat([frame, _findings(rng, n)], axis=1)
        frame.to_csv(root / f"{name}.csv", index=False)


def write_mimic_like(root: Path, n: int = 377_110, seed: int = 0) -> None:
    """MIMIC-CXR-JPG 2.0.0 metadata/split/chexpert CSVs (gzipped, as published) of the real size."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    subject = np.sort(rng.integers(10_000_000, 10_000_000 + 65_379 * 150, n) // 150 * 150 + 32)
    new_subject = np.r_[True, subject[1:] != subject[:-1]]
    study = 50_000_000 + np.cumsum((rng.random(n) < 0.6) | new_subject)  # ~1.65 images per study, one subject each
    dicom = [f"{i:08x}-{j:08x}-{j:08x}-{i:08x}-{j:08x}" for i, j in zip(range(n), rng.integers(0, 2**32, n))]
    view = rng.choice(["PA", "AP", "LATERAL", "LL", ""], n, p=[0.25, 0.4, 0.3, 0.04, 0.01])
    meta = pd.DataFrame({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                         "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                         "Rows": 3056, "Columns": 2544, "StudyDate": 21800506, "StudyTime": 213014.531})  # fmt: skip
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    by_subject = rng.choice(["train", "validate", "test"], subject.max() + 1 - subject.min(), p=[0.98, 0.008, 0.012])
    split = pd.DataFrame(
        {"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": by_subject[subject - subject.min()]}
    )
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    studies = meta.drop_duplicates("study_id")[["subject_id", "study_id"]].reset_index(drop=True)
    studies = studies.iloc[rng.random(len(studies)) < 0.99].reset_index(drop=True)  # a few unlabelled studies
    pd.concat([studies, _findings(rng, len(studies))], axis=1).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False
    )


def _timed_split(argv: list[str]) -> tuple[float, str]:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "shards", "split", *argv], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    return took, done.stdout.strip().splitlines()[-1]


def dataset_main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "chexpert").mkdir()
        (tmp / "mimic").mkdir()
        write_chexpert_like(tmp / "chexpert")
        write_mimic_like(tmp / "mimic")
        runs = [
            (
                "NIH official (real CSV)",
                ["--metadata", args.metadata, "--scheme", "official", "--out", str(tmp / "nih.parquet")],
            ),
            (
                "CheXpert official",
                ["--dataset", "chexpert", "--root", str(tmp / "chexpert"), "--out", str(tmp / "c.parquet")],
            ),
            (
                "MIMIC-CXR-JPG official",
                ["--dataset", "mimic", "--root", str(tmp / "mimic"), "--out", str(tmp / "m.parquet")],
            ),
            (
                "CheXpert stratified",
                [
                    "--dataset",
                    "chexpert",
                    "--root",
                    str(tmp / "chexpert"),
                    "--scheme",
                    "stratified",
                    "--out",
                    str(tmp / "cs.parquet"),
                ],
            ),  # fmt: skip
        ]
        lines = [
            f"generated layouts of the real size; wall clock of `cxr-shards split` (one process, interpreter "
            f"start included); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            "",
            "| run | wall s | summary line | goal |",
            "|---|---|---|---|",
        ]
        for name, argv in runs:
            took, summary = _timed_split(argv)
            goal = "" if name.startswith("NIH") else ("< 30 s: met" if took < 30 else "< 30 s: NOT met")
            lines.append(f"| {name} | {took:.1f} | {summary.split(' → ')[0]} | {goal} |")
    _append(
        args.append,
        "split of other data sets (issue 26)",
        "python bench/splits.py --datasets --append bench/RESULTS.md",
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
