"""The analysis and report of the evaluator on synthetic scores (no models, no shards).

Every number is checked against scikit-learn or a direct numpy computation in the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.special import expit, logit
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.evaluate import main as evaluate_main
from cxr.evaluation.predictions import predictions_frame, read_predictions
from cxr.evaluation.published import CHEXNET_2017, WANG_2017, published_mean
from cxr.evaluation.scores import ScoreSet
from cxr.evaluation.stats import bootstrap_counts
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

SPEC = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"


def synthetic(n: int, seed: int, prefix: str, members: int = 2, empty_label: int | None = None) -> ScoreSet:
    """Correlated member probabilities with some signal; optionally one label without positives."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.05, 0.35, len(LABELS))
    y = (rng.random((n, len(LABELS))) < prevalence).astype(np.uint8)
    if empty_label is not None:
        y[:, empty_label] = 0
    shared = rng.normal(size=y.shape)
    scores = {f"m{i}": expit(1.3 * y + shared + rng.normal(size=y.shape) - 1.5) for i in range(members)}
    # a few exact ties, as float32 model outputs produce
    scores["m0"] = np.round(scores["m0"], 3)
    return ScoreSet(keys=np.array([f"{prefix}{i:06d}_000" for i in range(n)], dtype=object), y_true=y, scores=scores)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    predictions_frame({"test": synthetic(400, 1, "1"), "val": synthetic(300, 2, "2")}).to_parquet(
        root / "predictions.parquet", index=False
    )
    return root / "predictions.parquet"


@pytest.fixture(scope="module")
def report(saved) -> Path:
    out = saved.parent / "out"
    assert evaluate_main(["--from-predictions", str(saved), "--bootstrap", "40", "--seed", "7", "--out", str(out)]) == 0
    return out


def _scores(report: Path, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    frame = pd.read_parquet(report / "predictions.parquet")
    frame = frame[frame["split"] == split].sort_values(["member", "key"])
    probs = {m: g[list(LABELS)].to_numpy() for m, g in frame.groupby("member")}
    y = frame[frame["member"] == "m0"][[f"true_{c}" for c in LABELS]].to_numpy()
    return y, probs


def test_cis_are_recomputable_with_sklearn_on_the_same_resamples(report):
    """Percentiles of sklearn's weighted AUROC over the documented resamples give the CIs."""
    y, probs = _scores(report, "test")
    counts = bootstrap_counts(len(y), 40, seed=7)
    aucs = pd.read_csv(report / "aucs.csv").set_index(["member", "label"])
    for member in ("m0", "ensemble"):
        per_resample = np.array(
            [
                [roc_auc_score(y[:, c], probs[member][:, c], sample_weight=counts[:, b]) for c in range(len(LABELS))]
                for b in range(counts.shape[1])
            ]
        )
        for c, label in enumerate(LABELS):
            row = aucs.loc[(member, label)]
            low, high = np.percentile(per_resample[:, c], [2.5, 97.5])
            assert row.ci_low == pytest.approx(low, abs=1e-9) and row.ci_high == pytest.approx(high, abs=1e-9)
            assert row.ci_low <= row.auroc <= row.ci_high
        low, high = np.percentile(per_resample.mean(axis=1), [2.5, 97.5])
        mean = aucs.loc[(member, "mean")]
        assert mean.ci_low == pytest.approx(low, abs=1e-9) and mean.ci_high == pytest.approx(high, abs=1e-9)
        assert mean.ci_low <= mean.auroc <= mean.ci_high


def _sklearn_threshold_row(y: np.ndarray, s: np.ndarray, thr: np.ndarray) -> dict[str, np.ndarray]:
    pred = (s >= thr).astype(int)
    per = {
        "sensitivity": [recall_score(y[:, c], pred[:, c], zero_division=0) for c in range(y.shape[1])],
        "specificity": [recall_score(y[:, c], pred[:, c], pos_label=0, zero_division=0) for c in range(y.shape[1])],
        "ppv": [precision_score(y[:, c], pred[:, c], zero_division=0) for c in range(y.shape[1])],
        "npv": [precision_score(y[:, c], pred[:, c], pos_label=0, zero_division=0) for c in range(y.shape[1])],
        "f1": [f1_score(y[:, c], pred[:, c], zero_division=0) for c in range(y.shape[1])],
    }
    per = {k: np.array(v) for k, v in per.items()}
    per["f1_macro"] = f1_score(y, pred, average="macro", zero_division=0)
    per["f1_micro"] = f1_score(y, pred, average="micro", zero_division=0)
    per["hamming"] = hamming_loss(y, pred)
    per["exact"] = accuracy_score(y, pred)
    return per


def test_metrics_csv_equals_sklearn_at_05_and_tuned(report):
    y, probs = _scores(report, "test")
    metrics = pd.read_csv(report / "metrics.csv")
    doc = json.loads((report / "thresholds.json").read_text())
    for member in ("m0", "m1", "ensemble"):
        sets = {
            "0.5": np.full(len(LABELS), 0.5),
            **{k: np.array([doc["members"][member][k][c] for c in LABELS]) for k in ("f1", "youden")},
        }
        for name, thr in sets.items():
            ref = _sklearn_threshold_row(y, probs[member], thr)
            rows = metrics[(metrics["member"] == member) & (metrics["thresholds"] == name)].set_index("label")
            for metric in ("sensitivity", "specificity", "ppv", "npv", "f1"):
                np.testing.assert_allclose(rows.loc[list(LABELS), metric].to_numpy(), ref[metric], atol=1e-12)
            np.testing.assert_allclose(rows.loc[list(LABELS), "threshold"].to_numpy(), thr, atol=0)
            assert rows.loc["macro", "f1"] == pytest.approx(ref["f1_macro"], abs=1e-12)
            assert rows.loc["micro", "f1"] == pytest.approx(ref["f1_micro"], abs=1e-12)
            assert rows.loc["macro", "hamming_loss"] == pytest.approx(ref["hamming"], abs=1e-12)
            assert rows.loc["macro", "exact_match"] == pytest.approx(ref["exact"], abs=1e-12)


def test_youden_thresholds_maximise_tpr_minus_fpr_on_val(report):
    y, probs = _scores(report, "val")
    doc = json.loads((report / "thresholds.json").read_text())
    for c, label in enumerate(LABELS):
        fpr, tpr, _ = roc_curve(y[:, c], probs["m1"][:, c], drop_intermediate=False)
        t = doc["members"]["m1"]["youden"][label]
        pred = probs["m1"][:, c] >= t
        got = pred[y[:, c] == 1].mean() - pred[y[:, c] == 0].mean()
        assert got == pytest.approx((tpr - fpr).max(), abs=1e-12)


def test_mean_logit_ensemble(saved, tmp_path):
    out = tmp_path / "logit"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(saved),
                "--bootstrap",
                "0",
                "--ensemble",
                "mean-logit",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    y, probs = _scores(out, "test")
    expected = expit((logit(np.clip(probs["m0"], 1e-15, 1 - 1e-15)) + logit(probs["m1"])) / 2)
    np.testing.assert_allclose(probs["ensemble"], expected, rtol=1e-12)
    aucs = pd.read_csv(out / "aucs.csv").set_index(["member", "label"])
    assert aucs.loc[("ensemble", "Edema"), "auroc"] == pytest.approx(roc_auc_score(y[:, 3], expected[:, 3]))
    assert aucs["ci_low"].isna().all()  # --bootstrap 0


def test_label_without_positives_is_nan_and_left_out_of_the_mean(tmp_path):
    path = tmp_path / "predictions.parquet"
    predictions_frame({"test": synthetic(200, 3, "1", empty_label=7), "val": synthetic(200, 4, "2")}).to_parquet(
        path, index=False
    )
    out = tmp_path / "out"
    assert evaluate_main(["--from-predictions", str(path), "--bootstrap", "20", "--no-figures", "--out", str(out)]) == 0
    aucs = pd.read_csv(out / "aucs.csv").set_index(["member", "label"])
    y, probs = _scores(out, "test")
    assert np.isnan(aucs.loc[("m0", "Hernia"), "auroc"]) and np.isnan(aucs.loc[("m0", "Hernia"), "auprc"])
    defined = [roc_auc_score(y[:, c], probs["m0"][:, c]) for c in range(len(LABELS)) if c != 7]
    assert aucs.loc[("m0", "mean"), "auroc"] == pytest.approx(np.mean(defined), abs=1e-12)
    assert "Hernia" in (out / "report.md").read_text().split("## Notes")[1]


def test_report_markdown_has_published_columns_prevalence_and_figures(report):
    text = (report / "report.md").read_text()
    y, _ = _scores(report, "test")
    for c, label in enumerate(LABELS):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == f"{100 * y[:, c].mean():.2f}"  # the split's prevalence, %
        assert cells[-2] == f"{WANG_2017.auroc[label]:.3f}" and cells[-1] == f"{CHEXNET_2017.auroc[label]:.3f}"
    assert "CheXNet 2017 †" in text and "not directly comparable" in text
    assert "![ROC curves](roc.png)" in text and "![Precision-recall curves](pr.png)" in text
    for png in ("roc.png", "pr.png"):
        with Image.open(report / png) as im:
            im.verify()


# The papers' own four-digit values: Wang et al. 2017 (ChestX-ray8, Table 4 of the arXiv v5 update on the
# 14 labels) and Rajpurkar et al. 2017 (CheXNet, Table 1). cxr.evaluation.published keeps them rounded half up to 3 digits.
PAPERS = {
    "Atelectasis": (0.7003, 0.8094),
    "Cardiomegaly": (0.8100, 0.9248),
    "Consolidation": (0.7032, 0.7901),
    "Edema": (0.8052, 0.8878),
    "Effusion": (0.7585, 0.8638),
    "Emphysema": (0.8330, 0.9371),
    "Fibrosis": (0.7859, 0.8047),
    "Hernia": (0.8717, 0.9164),
    "Infiltration": (0.6614, 0.7345),
    "Mass": (0.6933, 0.8676),
    "Nodule": (0.6687, 0.7802),
    "Pleural_Thickening": (0.6835, 0.8062),
    "Pneumonia": (0.6580, 0.7680),
    "Pneumothorax": (0.7993, 0.8887),
}


def test_published_columns_are_the_papers_values():
    assert set(PAPERS) == set(LABELS)
    for label, (wang, chexnet) in PAPERS.items():
        assert WANG_2017.auroc[label] == pytest.approx(wang, abs=5e-4 + 1e-9), label
        assert CHEXNET_2017.auroc[label] == pytest.approx(chexnet, abs=5e-4 + 1e-9), label
    assert published_mean(CHEXNET_2017) == pytest.approx(0.8414, abs=1e-3)  # CheXNet's reported mean


def test_published_table_matches_spec():
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not found (../shared beside the clone)")
    rows = re.findall(r"^\| (\w+) \| ([0-9.]+) \| ([0-9.]+) \|$", SPEC.read_text(), flags=re.M)
    table = {label: (float(w), float(c)) for label, w, c in rows}
    assert set(table) == set(LABELS)
    for label in LABELS:
        assert (WANG_2017.auroc[label], CHEXNET_2017.auroc[label]) == table[label]


def test_plotted_curves_equal_sklearn_roc_curve():
    from cxr.evaluation.figures import _cumulative_counts

    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.2
    s = np.round(rng.random(300) + 0.3 * y, 2)  # many ties
    tp, fp = _cumulative_counts(y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fp / fp[-1], fpr, atol=1e-15)
    np.testing.assert_allclose(tp / tp[-1], tpr, atol=1e-15)


def test_deduplicated_drops_repeats_and_sorts():
    s = ScoreSet(
        keys=np.array(["b", "a", "b", "c"], dtype=object),
        y_true=np.arange(4)[:, None],
        scores={"m": np.arange(4.0)[:, None]},
    )
    d = s.deduplicated()
    assert list(d.keys) == ["a", "b", "c"] and d.duplicates == 1
    assert d.scores["m"][:, 0].tolist() == [1.0, 0.0, 3.0]


def test_predictions_with_misaligned_members_are_refused(saved, tmp_path):
    frame = pd.read_parquet(saved)
    drop = frame.index[(frame["member"] == "m1") & (frame["split"] == "test")][:1]
    path = tmp_path / "bad.parquet"
    frame.drop(drop).to_parquet(path)
    with pytest.raises(CxrError, match="different key set"):
        read_predictions(path)


@pytest.mark.parametrize("members, entries", [(1, ["m0 (= ensemble of 1)"]), (2, ["m0", "m1", "ensemble"])])
def test_roc_legend_lists_only_visible_curves(tmp_path, monkeypatch, members, entries):
    """A 1-member report draws one ROC curve per panel (the ensemble of one is the member) and its
    legend lists it once; with 2 members every member and the ensemble are drawn and listed."""
    import matplotlib

    matplotlib.use("Agg")
    from cxr.evaluation import figures as report_module
    from cxr.evaluation.analysis import auc_table
    from cxr.evaluation.inference import with_ensemble

    scores = with_ensemble(synthetic(200, 3, "3", members=members), "mean-prob")
    aucs = auc_table(scores, n_boot=0)
    figures = []
    monkeypatch.setattr(report_module, "save_png", lambda fig, path: figures.append(fig))
    report_module.plot_curves(tmp_path / "roc.png", scores, aucs, {}, "roc", "test")
    axes = figures[0].axes
    curves = [ln for ln in axes[0].get_lines() if ln.get_linestyle() == "-"]
    assert len(curves) == len(entries)
    legend = [t.get_text() for t in axes[len(LABELS)].get_legend().get_texts()]
    assert legend[: len(entries)] == entries and legend[len(entries)].startswith("ensemble threshold")
