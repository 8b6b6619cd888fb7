"""Calibration, operating points with intervals, patient-level resampling and subgroups of the
evaluator, each against an independent reference: torchmetrics, scikit-learn, statsmodels, a scipy
fit written here, the O(m·n) DeLong definition, hand computations — and planted effects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from cxr.evaluate import main as evaluate_main
from cxr.evaluation import calibration as cal
from cxr.evaluation.metrics import threshold_for_target, wilson_interval
from cxr.evaluation.predictions import predictions_frame, read_predictions
from cxr.evaluation.report import ENSEMBLE, ScoreSet, analyse
from cxr.evaluation.stats import Resamples, unpaired_delong
from cxr.evaluation.subgroups import meta_from_table
from cxrbase.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _probs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities q, and q itself."""
    q = expit(rng.normal(-1.0, 1.5, n))
    return (rng.random(n) < q).astype(float), q


# ------------------------------------------------------------------ ECE, bins, Brier ---


@pytest.mark.integration
def test_ece_equal_width_equals_torchmetrics_and_a_hand_computation():
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    rng = np.random.default_rng(0)
    y, q = _probs(rng, 5000)
    p = np.clip(q + rng.normal(0, 0.1, q.size), 0, 1)  # miscalibrated
    ours = cal.ece(y, p, n_bins=15, strategy="width")[0]
    metric = BinaryCalibrationError(n_bins=15, norm="l1")
    reference = float(metric(torch.tensor(p, dtype=torch.float64), torch.tensor(y, dtype=torch.long)))
    assert ours == pytest.approx(reference, abs=1e-6)
    # hand: three bins of 1/3 width, five scores
    y5, p5 = np.array([0, 1, 1, 0, 1.0]), np.array([0.1, 0.2, 0.5, 0.6, 0.9])
    hand = (2 * abs(0.5 - 0.15) + 2 * abs(0.5 - 0.55) + 1 * abs(1 - 0.9)) / 5
    assert cal.ece(y5, p5, n_bins=3)[0] == pytest.approx(hand, abs=1e-12)


@pytest.mark.parametrize("strategy,sk", [("width", "uniform"), ("mass", "quantile")])
def test_reliability_bins_equal_sklearn_calibration_curve(strategy, sk):
    rng = np.random.default_rng(1)
    y, q = _probs(rng, 3000)
    p = expit(2 * logit(q))
    bins = cal.reliability_bins(y, p, 15, strategy)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy=sk)
    full = bins["count"] > 0
    np.testing.assert_allclose(bins["freq"][full], prob_true, atol=1e-12)
    np.testing.assert_allclose(bins["mean_p"][full], prob_pred, atol=1e-12)
    # ECE on the same bins, from sklearn's means and the bin sizes counted here by hand
    edges = np.linspace(0, 1, 16) if strategy == "width" else np.percentile(p, np.linspace(0, 100, 16))
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=15)
    hand = np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / p.size
    assert cal.ece(y, p, 15, strategy)[0] == pytest.approx(hand, abs=1e-12)


def test_brier_equals_sklearn_and_decomposes_exactly_on_binned_scores():
    rng = np.random.default_rng(2)
    y, q = _probs(rng, 4000)
    p = np.clip(q * 1.2, 0, 1)
    assert cal.brier(y, p)[0] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    # scores constant within each of the 15 bins (bin centres): Brier = REL − RES + UNC exactly
    centres = (np.floor(p * 15).clip(0, 14) + 0.5) / 15
    parts = cal.brier_decomposition(y, centres)
    total = parts["reliability"][0] - parts["resolution"][0] + parts["uncertainty"][0]
    assert total == pytest.approx(brier_score_loss(y, centres), abs=1e-12)
    assert parts["uncertainty"][0] == pytest.approx(y.mean() * (1 - y.mean()), abs=1e-15)


# ------------------------------------------------------------------ temperature and Platt ---


def test_temperature_and_platt_equal_an_independent_scipy_fit():
    from scipy.optimize import minimize, minimize_scalar

    rng = np.random.default_rng(3)
    y, q = _probs(rng, 4000)
    p = expit(1.7 * logit(q) + 0.4)
    x = np.log(np.clip(p, 1e-7, 1 - 1e-7) / (1 - np.clip(p, 1e-7, 1 - 1e-7)))

    def nll(z):
        return np.mean(np.logaddexp(0, z) - y * z)

    t_ref = minimize_scalar(lambda t: nll(x / t), bounds=(0.05, 20), method="bounded", options={"xatol": 1e-10}).x
    ab_ref = minimize(
        lambda ab: nll(ab[0] * x + ab[1]),
        [0.5, 0.0],
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000},
    ).x
    assert cal.fit_temperature(y, p) == pytest.approx(t_ref, rel=1e-5)
    np.testing.assert_allclose(cal.fit_platt(y, p), ab_ref, rtol=1e-4, atol=1e-5)


def test_a_slope_held_on_its_bound_still_gets_the_best_intercept():
    """Scores that rank the 2 positives of 20 images lowest, as on a small val split: the slope stops
    at its lower bound and the intercept is the bounded optimum of an independent fit (scipy's
    L-BFGS-B, same bound), close by hand to logit(2/20) since a ≈ 0. The fit used to return
    intercepts whose log-loss was up to 3.4× that optimum (28 of the 124 maps of a small demo report)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    p = np.sort(rng.uniform(0.05, 0.95, 20))
    y = np.zeros(20)
    y[:2] = 1  # the positives have the lowest scores
    x = logit(p)

    def nll(ab):
        z = ab[0] * x + ab[1]
        return np.sum(np.logaddexp(0, z) - y * z)

    low = cal._SLOPE_BOUNDS[0]
    ref = minimize(nll, [1.0, 0.0], method="L-BFGS-B", bounds=[cal._SLOPE_BOUNDS, (None, None)], tol=1e-14)
    a, b = cal.fit_platt(y, p)
    assert a == low and ref.x[0] == pytest.approx(low)
    assert b == pytest.approx(ref.x[1], abs=1e-5) and b == pytest.approx(np.log(2 / 18), abs=0.01)
    assert nll([a, b]) <= ref.fun + 1e-9
    assert cal.fit_temperature(y, p) == pytest.approx(1 / low)


def _miscalibrated(n: int, seed: int, temperature: float) -> ScoreSet:
    """Scores sharpened by a known temperature: p = σ(T · logit q) where q is the true probability."""
    rng = np.random.default_rng(seed)
    q = expit(rng.normal(-1.5, 1.2, (n, len(LABELS))))
    y = (rng.random(q.shape) < q).astype(np.uint8)
    return ScoreSet(
        keys=np.array([f"{seed}{i:07d}_000" for i in range(n)], dtype=object),
        y_true=y,
        scores={"m0": expit(temperature * logit(q))},
    )


@pytest.mark.integration
def test_known_temperature_is_recovered_and_ece_more_than_halved():
    val, test = _miscalibrated(8000, 1, 2.5), _miscalibrated(8000, 2, 2.5)
    analysis = analyse(test, val, tuning_split="val", n_boot=50, subgroups=[])
    labels = analysis.calibration_doc["labels"]
    for label in LABELS:
        assert labels[label]["temperature"] == pytest.approx(2.5, rel=0.05), label
        assert labels[label]["method"] in ("temperature", "platt")
    table = analysis.calibration.set_index(["variant", "label"])
    raw, after = table.loc[("raw", "mean"), "ece_width"], table.loc[("calibrated", "mean"), "ece_width"]
    assert after < raw / 2
    # the CI of the raw ECE is a bootstrap interval around it
    assert table.loc[("raw", "mean"), "ece_width_low"] < raw < table.loc[("raw", "mean"), "ece_width_high"]
    # a monotone map: AUROC unchanged for every label
    for c in range(len(LABELS)):
        assert roc_auc_score(test.y_true[:, c], analysis.calibrated[:, c]) == pytest.approx(
            roc_auc_score(test.y_true[:, c], test.scores["m0"][:, c]), abs=1e-12
        )


def test_well_calibrated_scores_keep_the_identity_map():
    rng = np.random.default_rng(4)
    y, q = _probs(rng, 6000)
    entry = cal.fit_label(y, q)
    assert entry["method"] == "none"  # cross-validated: fitting a map does not help on held-out folds
    assert entry["temperature"] == pytest.approx(1.0, abs=0.06)


def test_calibration_json_round_trips_and_bad_files_are_refused(tmp_path):
    doc = cal.calibration_document(
        {"A": {"method": "platt", "a": 0.5, "b": -1.0, "temperature": 2.0}}, "ensemble", "val", 10
    )
    path = cal.write_calibration(tmp_path, doc)
    back = cal.read_calibration(path)
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(cal.apply_map(p, back["labels"]["A"]), expit(0.5 * logit(p) - 1.0))
    path.write_text(json.dumps({"labels": {"A": {"method": "isotonic"}}}))
    with pytest.raises(Exception, match="not an evaluator calibration.json"):
        cal.read_calibration(path)


# ------------------------------------------------------------------ operating points ---


def test_wilson_interval_equals_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    k = np.array([0, 1, 7, 50, 99, 100, 3])
    n = np.array([100, 100, 20, 100, 100, 100, 3])
    low, high = wilson_interval(k, n, 0.05)
    ref_low, ref_high = proportion_confint(k, n, alpha=0.05, method="wilson")
    np.testing.assert_allclose(low, ref_low, atol=1e-12)
    np.testing.assert_allclose(high, ref_high, atol=1e-12)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_target_thresholds_equal_sklearn_roc_curve():
    rng = np.random.default_rng(5)
    y = (rng.random((2000, 3)) < 0.2).astype(int)
    s = np.round(expit(y + rng.normal(size=y.shape)), 3)  # ties
    for c in range(3):
        fpr, tpr, thr = roc_curve(y[:, c], s[:, c], drop_intermediate=False)
        finite = np.isfinite(thr) & (thr <= 1)
        assert threshold_for_target(y, s, "sensitivity", 0.9)[c] == thr[finite & (tpr >= 0.9)].max()
        assert threshold_for_target(y, s, "specificity", 0.9)[c] == thr[finite & (1 - fpr >= 0.9)].min()


def test_unpaired_delong_equals_the_mn_definition():
    from scipy.stats import norm

    rng = np.random.default_rng(6)

    def mn(y, s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        v10, v01 = psi.mean(1), psi.mean(0)
        return psi.mean(), v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size

    y1, y2 = (rng.random(300) < 0.3).astype(int), (rng.random(200) < 0.4).astype(int)
    s1, s2 = np.round(y1 + rng.normal(size=300), 1), np.round(0.5 * y2 + rng.normal(size=200), 1)
    (a1, v1), (a2, v2) = mn(y1, s1), mn(y2, s2)
    z = (a1 - a2) / np.sqrt(v1 + v2)
    out = unpaired_delong(y1, s1, y2, s2)
    assert out["auc_1"] == pytest.approx(a1, abs=1e-12) and out["auc_2"] == pytest.approx(a2, abs=1e-12)
    assert out["var"] == pytest.approx(v1 + v2, rel=1e-10)
    assert out["p"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-8)


# ------------------------------------------------------------------ patients, subgroups ---


def _with_meta(n: int, seed: int, prefix: str, worse_sex: str | None = None, worse_label: int = 3) -> ScoreSet:
    """Patients with 1–6 images, age, sex, view, follow-up; the ensemble sees a signal of 1.5 logits,
    except for ``worse_sex`` on ``worse_label`` where it is pure noise."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n), rng.integers(1, 7, n))[:n]
    per_patient_sex = rng.choice(["M", "F"], patient.max() + 1)
    sex = per_patient_sex[patient]
    followup = np.concatenate([np.arange(k) for k in np.bincount(patient)])
    y = (rng.random((n, len(LABELS))) < 0.15).astype(np.uint8)
    signal = 1.5 * y.astype(float)
    if worse_sex:
        signal[sex == worse_sex, worse_label] = 0.0
    scores = {"m0": expit(signal + rng.normal(size=y.shape) - 1.8)}
    scores[ENSEMBLE] = scores["m0"]
    keys = np.array([f"{prefix}{p:07d}_{f:03d}" for p, f in zip(patient, followup)], dtype=object)
    meta = pd.DataFrame(
        {
            "patient": patient,
            "age": rng.integers(1, 95, n),
            "sex": sex,
            "view": rng.choice(["PA", "AP"], n),
            "followup": followup,
        }
    )
    return ScoreSet(keys=keys, y_true=y, scores=scores, meta=meta)


def test_patient_resamples_move_a_patients_images_together():
    units = np.array([5, 5, 9, 1, 9, 9])
    r = Resamples(6, 200, seed=0, units=units)
    counts = r.counts
    assert r.level == "patient" and r.n_units == 3
    np.testing.assert_array_equal(counts[0], counts[1])
    np.testing.assert_array_equal(counts[2], counts[4])
    np.testing.assert_array_equal(r.unit_counts.sum(axis=0), 3)  # three patients drawn per resample
    values = np.arange(12.0).reshape(6, 2)
    np.testing.assert_allclose(r.sums(values), counts.T.astype(np.float64) @ values, rtol=1e-6)


@pytest.mark.integration
def test_planted_sex_gap_is_significant_on_that_label_only():
    test = _with_meta(9000, 1, "1", worse_sex="F", worse_label=3)
    val = _with_meta(3000, 2, "2")
    analysis = analyse(test, val, tuning_split="val", n_boot=200, subgroups=["sex"], calibrate=False)
    sex = analysis.subgroups[(analysis.subgroups["metric"] == "auroc") & (analysis.subgroups["group"] == "F")]
    if sex["reference"].iloc[0] == "F":  # the larger group is the reference: look at M's row instead
        sex = analysis.subgroups[(analysis.subgroups["metric"] == "auroc") & (analysis.subgroups["group"] == "M")]
    sex = sex.set_index("label")
    significant = sex.index[sex["p_holm"] < 0.05].tolist()
    assert significant == [LABELS[3]]
    gap = sex.loc[LABELS[3]]
    assert gap.gap_low > 0 or gap.gap_high < 0  # its bootstrap CI excludes 0


@pytest.mark.integration
def test_subgroup_aurocs_and_underdiagnosis_equal_sklearn_on_hand_filtered_rows():
    test, val = _with_meta(3000, 3, "1"), _with_meta(2000, 4, "2")
    analysis = analyse(
        test,
        val,
        tuning_split="val",
        n_boot=50,
        calibrate=False,
        subgroups=["sex", "age:20,40,60,80", "view", "followup"],
    )
    table = analysis.subgroups
    age, s, y = test.meta["age"].to_numpy(), test.scores[ENSEMBLE], test.y_true
    masks = {
        ("sex", "F"): test.meta["sex"].to_numpy() == "F",
        ("age bands", "40–60"): (age >= 40) & (age < 60),
        ("age bands", "≥80"): age >= 80,
        ("view", "AP"): test.meta["view"].to_numpy() == "AP",
        ("followup", "first study"): test.meta["followup"].to_numpy() == 0,
    }
    threshold = analysis.tuned[ENSEMBLE]["f1"]
    for (grouping, group), m in masks.items():
        rows = table[(table["grouping"] == grouping) & (table["group"] == group)].set_index("label")
        for c, label in enumerate(LABELS):
            assert rows.loc[label, "value"] == pytest.approx(roc_auc_score(y[m, c], s[m, c]), abs=1e-12)
            assert rows.loc[label, "n_pos"] == y[m, c].sum()
        sick = y[m].any(axis=1)
        healthy_call = ~(s[m] >= threshold).any(axis=1)
        assert rows.loc["No Finding (FPR)", "value"] == pytest.approx((sick & healthy_call).sum() / sick.sum())
    assert set(table.loc[table["grouping"] == "age bands", "group"]) == {"<20", "20–40", "40–60", "60–80", "≥80"}


def test_meta_comes_from_the_splits_table_with_followup_from_the_name(tmp_path):
    table = pd.DataFrame(
        {
            "image": ["00000001_000.png", "00000001_001.png", "00000002_000.png"],
            "patient": [1, 1, 2],
            "split": ["test"] * 3,
            **{label: [0, 1, 0] for label in LABELS},
            "age": [30, 31, 70],
            "sex": ["M", "M", "F"],
            "view": ["PA", "AP", "PA"],
        }
    )
    table.to_parquet(tmp_path / "splits.parquet", index=False)
    meta = meta_from_table(np.array(["00000002_000", "00000001_001"], dtype=object), tmp_path / "splits.parquet")
    assert meta["patient"].tolist() == [2, 1] and meta["sex"].tolist() == ["F", "M"]
    assert meta["followup"].tolist() == [0, 1] and meta["age"].tolist() == [70, 31]
    with pytest.raises(Exception, match="not in this splits table"):
        meta_from_table(np.array(["00000003_000"], dtype=object), tmp_path / "splits.parquet")


# ------------------------------------------------------------------ the CLI, end to end ---


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calib")
    test, val = _with_meta(1500, 7, "1", worse_sex="F"), _with_meta(1000, 8, "2")
    test.scores.pop(ENSEMBLE), val.scores.pop(ENSEMBLE)
    test.scores["m1"], val.scores["m1"] = expit(2 * logit(test.scores["m0"])), expit(2 * logit(val.scores["m0"]))
    predictions_frame({"test": test, "val": val}).to_parquet(root / "predictions.parquet", index=False)
    out = root / "out"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(root / "predictions.parquet"),
                "--bootstrap",
                "100",
                "--subgroups",
                "Patient Gender",
                "View Position",
                "age:40,60",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.mark.integration
def test_report_has_calibration_operating_points_and_subgroups(report):
    text = (report / "report.md").read_text()
    for heading in (
        "## Operating points of `ensemble`",
        "## Calibration of `ensemble`",
        "## Subgroups of `ensemble`",
        "### sex — AUROC",
        "### view — AUROC",
        "### age bands — AUROC",
        "### Under-diagnosis",
    ):
        assert heading in text, heading
    assert "bootstrap over patients" in text
    assert (report / "reliability.png").stat().st_size > 10_000
    doc = cal.read_calibration(report / "calibration.json")
    assert doc["member"] == ENSEMBLE and doc["fitted_on"] == "val" and set(doc["labels"]) == set(LABELS)
    # predictions.parquet carries the subgroup columns: the re-analysis needs no table
    saved = read_predictions(report / "predictions.parquet")["test"]
    assert {"patient", "age", "sex", "view", "followup"} <= set(saved.meta.columns)


def test_metrics_csv_intervals_equal_statsmodels(report):
    from statsmodels.stats.proportion import proportion_confint

    metrics = pd.read_csv(report / "metrics.csv")
    assert {"sens90", "sens95", "spec90"} <= set(metrics["thresholds"])
    rows = metrics[metrics["label"].isin(LABELS)]
    for metric, (hit, miss) in {
        "sensitivity": ("tp", "fn"),
        "specificity": ("tn", "fp"),
        "ppv": ("tp", "fp"),
        "npv": ("tn", "fn"),
    }.items():
        n = rows[hit] + rows[miss]
        ok = n > 0
        low, high = proportion_confint(rows.loc[ok, hit], n[ok], alpha=0.05, method="wilson")
        np.testing.assert_allclose(rows.loc[ok, f"{metric}_low"], low, atol=1e-12)
        np.testing.assert_allclose(rows.loc[ok, f"{metric}_high"], high, atol=1e-12)
    focus = rows[rows["member"] == ENSEMBLE]
    assert (focus["f1_low"] <= focus["f1"] + 1e-12).all() and (focus["f1"] <= focus["f1_high"] + 1e-12).all()


@pytest.mark.integration
def test_image_resampling_is_an_option_and_says_so(report, tmp_path):
    out = tmp_path / "image"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--bootstrap",
                "30",
                "--resample",
                "image",
                "--subgroups",
                "none",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = (out / "report.md").read_text()
    assert "bootstrap over images" in text and "## Subgroups" not in text
    patient = pd.read_csv(report / "aucs.csv").query("member == 'ensemble' and label == 'mean'").iloc[0]
    image = pd.read_csv(out / "aucs.csv").query("member == 'ensemble' and label == 'mean'").iloc[0]
    assert patient.auroc == pytest.approx(image.auroc, abs=1e-12)


def test_unknown_subgroup_column_is_a_clear_error(report, tmp_path, capsys):
    rc = evaluate_main(
        [
            "--from-predictions",
            str(report / "predictions.parquet"),
            "--bootstrap",
            "0",
            "--subgroups",
            "Race",
            "--no-figures",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc != 0
    assert "--subgroups 'Race': no column 'Race'" in capsys.readouterr().err


def test_ablation_table_gains_calibration_and_subgroup_columns(tmp_path):
    from cxr.tools.ablation import Run, analyse_sweep, report_markdown

    base = _with_meta(1200, 9, "1", worse_sex="F")
    rng = np.random.default_rng(9)
    runs, scores = [], {}
    for res in (32, 64):
        name = f"res{res}"
        scores[name] = expit(
            (1 if res == 32 else 2) * logit(base.scores["m0"]) + 0.1 * rng.normal(size=base.y_true.shape)
        )
        runs.append(Run(name, tmp_path / name, res, 0, {}))
    result = analyse_sweep(ScoreSet(base.keys, base.y_true, scores, meta=base.meta), runs, n_boot=0)
    rows = result["table"][result["table"]["variant"] == "64"].set_index("label")
    y, p, sex = base.y_true, scores["res64"], base.meta["sex"].to_numpy()
    larger, other = ("M", "F") if (sex == "M").sum() >= (sex == "F").sum() else ("F", "M")
    for c, label in enumerate(LABELS):
        assert rows.loc[label, "brier"] == pytest.approx(brier_score_loss(y[:, c], p[:, c]), abs=1e-12)
        gap = roc_auc_score(y[sex == other, c], p[sex == other, c]) - roc_auc_score(
            y[sex == larger, c], p[sex == larger, c]
        )
        assert rows.loc[label, "gap_sex"] == pytest.approx(gap, abs=1e-12)
    assert {"ece_width", "ece_mass", "gap_age_bands", "gap_view", "gap_followup"} <= set(rows.columns)
    text = report_markdown(result, pd.DataFrame(), {"split": "test", "runs": 2, "source": "test"})
    assert "## Calibration and subgroup gaps per variant" in text


def test_micro_rows_carry_wilson_intervals_of_the_summed_counts(report):
    from statsmodels.stats.proportion import proportion_confint

    metrics = pd.read_csv(report / "metrics.csv")
    for (member, name), part in metrics.groupby(["member", "thresholds"]):
        labels = part[part["label"].isin(LABELS)]
        micro = part[part["label"] == "micro"].iloc[0]
        tp, fn = labels["tp"].sum(), labels["fn"].sum()
        low, high = proportion_confint(tp, tp + fn, alpha=0.05, method="wilson")
        assert micro["sensitivity_low"] == pytest.approx(low, abs=1e-12)
        assert micro["sensitivity_high"] == pytest.approx(high, abs=1e-12)


@pytest.mark.integration
def test_old_predictions_take_subgroup_columns_from_splits(report, tmp_path, capsys):
    frame = pd.read_parquet(report / "predictions.parquet")
    old = frame[[c for c in frame.columns if not c.startswith("meta_")]]  # as written before the columns existed
    old.to_parquet(tmp_path / "predictions.parquet", index=False)
    first = frame.drop_duplicates("key")
    table = pd.DataFrame(
        {
            "image": first["key"] + ".png",
            "patient": first["meta_patient"],
            "split": first["split"],
            **{label: first[f"true_{label}"].astype(np.uint8) for label in LABELS},
            "age": first["meta_age"],
            "sex": first["meta_sex"],
            "view": first["meta_view"],
        }
    )
    table.to_parquet(tmp_path / "splits.parquet", index=False)
    out = tmp_path / "out"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(tmp_path / "predictions.parquet"),
                "--splits",
                str(tmp_path / "splits.parquet"),
                "--bootstrap",
                "20",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = (out / "report.md").read_text()
    assert "bootstrap over patients" in text and "### followup — AUROC" in text  # follow-up read off the names
    without = tmp_path / "without"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(tmp_path / "predictions.parquet"),
                "--bootstrap",
                "20",
                "--no-figures",
                "--out",
                str(without),
            ]
        )
        == 0
    )
    assert "bootstrap over images" in (without / "report.md").read_text()
    table.iloc[5:].to_parquet(tmp_path / "partial.parquet", index=False)
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(tmp_path / "predictions.parquet"),
                "--splits",
                str(tmp_path / "partial.parquet"),
                "--bootstrap",
                "0",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "evaluated images are not in this splits table" in capsys.readouterr().err


def test_patient_bootstrap_widens_cis_when_a_patients_images_agree():
    """Patients of 10 images that share their labels and most of their score: the images are not
    independent, so resampling patients must give clearly wider AUROC intervals than resampling images."""
    rng = np.random.default_rng(11)
    patients = np.repeat(np.arange(300), 10)
    y = np.repeat((rng.random((300, len(LABELS))) < 0.3).astype(np.uint8), 10, axis=0)
    effect = np.repeat(rng.normal(size=(300, len(LABELS))), 10, axis=0)
    s = expit(y + effect + 0.2 * rng.normal(size=y.shape))
    scores = ScoreSet(
        keys=np.array([f"{p:08d}_{i % 10:03d}" for i, p in enumerate(patients)], dtype=object),
        y_true=y,
        scores={"m0": s},
        meta=pd.DataFrame({"patient": patients}),
    )
    by_patient = analyse(scores, None, tuning_split=None, n_boot=300, subgroups=[], calibrate=False)
    by_image = analyse(scores, None, tuning_split=None, n_boot=300, subgroups=[], calibrate=False, resample="image")
    assert by_patient.resampling == "patient" and by_image.resampling == "image"

    def width(a):
        mean = a.aucs[a.aucs["label"] == "mean"].iloc[0]
        return mean.ci_high - mean.ci_low

    assert width(by_patient) > 2 * width(by_image)
