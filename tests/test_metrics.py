"""cxr.evaluation.metrics against scikit-learn, brute force and hand computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.evaluation import metrics as M
from cxr.evaluation import stats as S
from cxr.evaluation.metrics import UndefinedMetricWarning
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

L = 14


def random_data(n=600, seed=0, decimals=2):
    """NIH-like prevalences, informative scores rounded so that ties are common."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.02, 0.4, L)
    y = (rng.random((n, L)) < prevalence).astype(int)
    s = np.clip(rng.normal(0.3 + 0.25 * y, 0.2), 0, 1).round(decimals)
    return y, s


def sk_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- ranking metrics
def test_auroc_and_auprc_equal_sklearn_with_ties():
    y, s = random_data()
    assert len(np.unique(s[:, 0])) < 100  # many ties
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on well-defined data
        auroc, auprc = M.per_label_auroc(y, s), M.per_label_auprc(y, s)
    np.testing.assert_allclose(auroc, [roc_auc_score(y[:, c], s[:, c]) for c in range(L)], rtol=1e-12)
    np.testing.assert_allclose(auprc, [average_precision_score(y[:, c], s[:, c]) for c in range(L)], rtol=1e-12)


def test_label_without_positives_or_negatives_is_nan_with_one_warning():
    y, s = random_data()
    y[:, 7] = 0  # Hernia: no positives
    y[:, 2] = 1  # Consolidation: no negatives
    with pytest.warns(UndefinedMetricWarning) as record:
        auroc = M.per_label_auroc(y, s)
    assert len(record) == 1
    message = str(record[0].message)
    assert "Hernia (no positives)" in message and "Consolidation (no negatives)" in message
    assert np.isnan(auroc[[2, 7]]).all() and np.isfinite(np.delete(auroc, [2, 7])).all()
    with pytest.warns(UndefinedMetricWarning, match="Hernia"):
        auprc = M.per_label_auprc(y, s)
    assert np.isnan(auprc[7])
    assert auprc[2] == pytest.approx(average_precision_score(y[:, 2], s[:, 2]))  # = 1.0, defined


def test_all_constant_scores():
    y, _ = random_data()
    s = np.full(y.shape, 0.3)
    np.testing.assert_allclose(M.per_label_auroc(y, s), 0.5)
    np.testing.assert_allclose(
        M.per_label_auprc(y, s), [average_precision_score(y[:, c], s[:, c]) for c in range(L)], rtol=1e-12
    )
    np.testing.assert_allclose(S.delong_auroc_variance(y, s), 0.0, atol=1e-15)


def test_bad_inputs_are_clear_errors():
    y, s = random_data(n=20)
    with pytest.raises(CxrError, match="must be equal"):
        M.per_label_auroc(y, s[:, :3])
    with pytest.raises(CxrError, match="0/1"):
        M.per_label_auroc(y * 2, s)
    with pytest.raises(CxrError, match="one per label"):
        M.threshold_metrics(y, s, np.full(13, 0.5))
    s[0, 0] = np.nan
    with pytest.raises(CxrError, match="NaN"):
        M.per_label_auroc(y, s)


# ---------------------------------------------------------------- threshold metrics
def sklearn_threshold_metrics(y, pred):
    """Reference per-label, macro and micro values from sklearn (its default zero_division)."""
    mcm = multilabel_confusion_matrix(y, pred)  # [L, 2, 2]: [[tn, fp], [fn, tp]]
    per = {
        "sensitivity": sk_quiet(recall_score, y, pred, average=None),
        "ppv": sk_quiet(precision_score, y, pred, average=None),
        "f1": sk_quiet(f1_score, y, pred, average=None),
        "specificity": np.array([sk_quiet(recall_score, y[:, c], pred[:, c], pos_label=0) for c in range(L)]),
        "npv": np.array([sk_quiet(precision_score, y[:, c], pred[:, c], pos_label=0) for c in range(L)]),
    }
    total = mcm.sum(axis=0)
    tn, fp, fn, tp = total.ravel()
    micro = {
        "sensitivity": sk_quiet(recall_score, y, pred, average="micro"),
        "ppv": sk_quiet(precision_score, y, pred, average="micro"),
        "f1": sk_quiet(f1_score, y, pred, average="micro"),
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "npv": tn / (tn + fn) if tn + fn else 0.0,
    }
    macro = {
        "sensitivity": sk_quiet(recall_score, y, pred, average="macro"),
        "ppv": sk_quiet(precision_score, y, pred, average="macro"),
        "f1": sk_quiet(f1_score, y, pred, average="macro"),
        "specificity": per["specificity"].mean(),
        "npv": per["npv"].mean(),
    }
    return per, macro, micro, mcm


def test_threshold_metrics_equal_sklearn_including_zero_division():
    y, s = random_data(seed=1)
    y[:, 7] = 0  # no positives: sensitivity 0/0
    thresholds = np.random.default_rng(2).uniform(0.2, 0.7, L)
    thresholds[3] = 2.0  # no predicted positives: PPV 0/0
    thresholds[4] = -1.0  # no predicted negatives: NPV 0/0
    with pytest.warns(UndefinedMetricWarning) as record:
        got = M.threshold_metrics(y, s, thresholds)
    assert len(record) == 1
    for case in ("sensitivity of Hernia", "ppv of Edema", "npv of Effusion"):
        assert case in str(record[0].message)
    pred = (s >= thresholds).astype(int)
    per, macro, micro, mcm = sklearn_threshold_metrics(y, pred)
    for name in M.RATIO_METRICS:
        np.testing.assert_allclose(got[name], per[name], rtol=1e-12, err_msg=name)
        assert got["macro"][name] == pytest.approx(macro[name], rel=1e-12), name
        assert got["micro"][name] == pytest.approx(micro[name], rel=1e-12), name
    np.testing.assert_array_equal(np.stack([got["tn"], got["fp"], got["fn"], got["tp"]], 1), mcm.reshape(L, 4))
    assert got["hamming_loss"] == pytest.approx(hamming_loss(y, pred), rel=1e-12)
    assert got["exact_match"] == pytest.approx(accuracy_score(y, pred), rel=1e-12)
    assert got["ppv"][3] == 0.0 and got["npv"][4] == 0.0 and got["sensitivity"][7] == 0.0


def test_scalar_threshold_is_inclusive():
    y = np.array([[1], [0], [1], [0]])
    s = np.array([0.5, 0.5, 0.2, 0.1])
    got = M.threshold_metrics(y, s, 0.5)  # score == threshold counts as positive
    assert (got["tp"][0], got["fp"][0], got["fn"][0], got["tn"][0]) == (1, 1, 1, 1)


# ---------------------------------------------------------------- tuned thresholds
@pytest.mark.integration
def test_f1_threshold_beats_every_candidate_by_brute_force():
    y, s = random_data(n=300, seed=4)
    tuned = M.tune_thresholds(y, s, "f1")
    for c in (0, 4, 8, 13):  # rare to common; sklearn in a loop is slow
        f1_at = lambda t: sk_quiet(f1_score, y[:, c], (s[:, c] >= t).astype(int))  # noqa: E731
        candidates = np.r_[np.unique(s[:, c]), np.linspace(-0.1, 1.1, 25)]
        best = max(f1_at(t) for t in candidates)
        assert f1_at(tuned[c]) == pytest.approx(best, abs=1e-12), LABELS[c]


def test_youden_threshold_maximises_tpr_minus_fpr():
    y, s = random_data(n=300, seed=5)
    tuned = M.tune_thresholds(y, s, "youden")
    for c in range(L):
        fpr, tpr, _ = roc_curve(y[:, c], s[:, c])
        pred = s[:, c] >= tuned[c]
        j = pred[y[:, c] == 1].mean() - pred[y[:, c] == 0].mean()
        assert j == pytest.approx(np.max(tpr - fpr), abs=1e-12), LABELS[c]


def test_tune_thresholds_undefined_label_and_bad_method():
    y, s = random_data(n=100)
    y[:, 0] = 0
    with pytest.warns(UndefinedMetricWarning, match="Atelectasis"):
        assert M.tune_thresholds(y, s, "youden")[0] == 0.5
    with pytest.raises(CxrError, match="'f1' or 'youden'"):
        M.tune_thresholds(y, s, "accuracy")


# ---------------------------------------------------------------- calibration
def test_calibration_against_hand_computation():
    o = 0.2
    x = np.array([0.0, 0.1, 0.2, 0.6, 1.0])
    # 0.1 / 0.4 = 0.25; 1 - 0.4 / (2 * 0.8) = 0.75
    np.testing.assert_allclose(M.calibrate(x, o), [0.0, 0.25, 0.5, 0.75, 1.0], rtol=1e-15)
    ops = np.array([0.05, 0.5, 0.9])
    grid = np.linspace(0, 1, 1001)[:, None].repeat(3, axis=1)
    out = M.calibrate(grid, ops)
    np.testing.assert_allclose(M.calibrate(ops[None], ops)[0], 0.5, rtol=1e-15)
    assert (np.diff(out, axis=0) > 0).all()  # strictly monotone
    assert out[0].tolist() == [0, 0, 0] and out[-1].tolist() == [1, 1, 1]
    np.testing.assert_allclose(out[:, 1], grid[:, 1], atol=1e-15)  # o = 0.5 is the identity
    with pytest.raises(CxrError, match="strictly in"):
        M.calibrate(x, 0.0)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_counts_are_resamples():
    counts = S.bootstrap_counts(1000, 300, seed=7)
    assert counts.shape == (1000, 300) and counts.dtype == np.float32
    np.testing.assert_array_equal(counts.sum(axis=0), 1000)
    assert counts.min() >= 0 and np.array_equal(counts, np.round(counts))
    # Poisson(1)-like: a fraction 1 - 1/e of the images is drawn at least once per resample.
    assert (counts > 0).mean() == pytest.approx(1 - math.exp(-1), abs=0.01)
    np.testing.assert_array_equal(counts, S.bootstrap_counts(1000, 300, seed=7))


def test_bootstrap_resample_equals_sklearn_weighted_auroc():
    y, s = random_data(n=500, seed=8)
    s2 = np.clip(s + np.random.default_rng(1).normal(0, 0.1, s.shape), 0, 1).round(2)
    counts = S.bootstrap_counts(500, 40, seed=3)
    results = S.bootstrap_auroc(y, [s, s2], counts=counts)
    for scores, res in zip([s, s2], results):
        for b in (0, 17, 39):
            w = counts[:, b]
            expected = [roc_auc_score(y[:, c], scores[:, c], sample_weight=w) for c in range(L)]
            np.testing.assert_allclose(res["samples"][b], expected, rtol=1e-13)
            rows = np.repeat(np.arange(500), w.astype(int))  # the same resample as explicit indices
            assert res["samples"][b, 5] == pytest.approx(roc_auc_score(y[rows, 5], scores[rows, 5]), rel=1e-13)
            assert res["mean_samples"][b] == pytest.approx(np.mean(expected), rel=1e-13)
        np.testing.assert_allclose(res["auroc"], [roc_auc_score(y[:, c], scores[:, c]) for c in range(L)])
        assert res["ci_low"].shape == (L,) and (res["ci_low"] <= res["auroc"]).all()
        assert (res["auroc"] <= res["ci_high"]).all()


def test_bootstrap_with_arbitrary_weights_and_float_ties():
    rng = np.random.default_rng(9)
    y = rng.random((300, 2)) < 0.3
    s = rng.integers(0, 5, size=(300, 2)) / 7.0  # heavy ties, non-round floats
    counts = rng.integers(0, 4, size=(300, 3))  # int64 weights are accepted too
    res = S.bootstrap_auroc(y, s, counts=counts)
    for b in range(3):
        expected = [roc_auc_score(y[:, c], s[:, c], sample_weight=counts[:, b]) for c in range(2)]
        np.testing.assert_allclose(res["samples"][b], expected, rtol=1e-13)


def test_bootstrap_undefined_label_and_empty_resamples():
    rng = np.random.default_rng(10)
    y = (rng.random((60, 3)) < 0.3).astype(int)
    y[:, 0] = 0
    y[:, 1] = 0
    y[5, 1] = 1  # one positive: many resamples miss it
    s = rng.random((60, 3))
    with pytest.warns(UndefinedMetricWarning, match="label_0"):
        res = S.bootstrap_auroc(y, s, n_boot=200, seed=1)
    assert np.isnan(res["samples"][:, 0]).all() and np.isnan(res["ci_low"][0])
    missed = S.bootstrap_counts(60, 200, seed=1)[5] == 0
    assert missed.any() and np.array_equal(np.isnan(res["samples"][:, 1]), missed)
    assert res["n_valid_labels"][1] == (~missed).sum() and res["n_valid_all"] == (~missed).sum()
    assert res["n_valid"] == 200  # per-label mean: a resample without label 1's positive keeps label 2
    assert res["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, c], s[:, c]) for c in (1, 2)]))


@pytest.mark.integration
def test_mean_auroc_ci_is_per_label_mean_over_resamples_checked_with_sklearn():
    """A label with 1 positive misses it in ~37 % of resamples; the mean CI still uses every
    resample (mean over the labels defined in it). Reference: sklearn on each resample."""
    rng = np.random.default_rng(21)
    n = 40
    y = (rng.random((n, 3)) < 0.4).astype(int)
    y[:, 0] = 0
    y[7, 0] = 1  # one positive
    s = np.clip(0.3 * y + rng.random((n, 3)), 0, 1)
    counts = S.bootstrap_counts(n, 300, seed=2)
    res = S.bootstrap_auroc(y, s, counts=counts)
    means, valid_labels = [], np.zeros(3, int)
    for b in range(counts.shape[1]):
        rows = np.repeat(np.arange(n), counts[:, b].astype(int))
        aucs = []
        for c in range(3):
            if 0 < y[rows, c].sum() < rows.size:
                aucs.append(roc_auc_score(y[rows, c], s[rows, c]))
                valid_labels[c] += 1
        means.append(np.mean(aucs))
    assert res["n_valid"] == 300 and list(res["n_valid_labels"]) == list(valid_labels)
    assert valid_labels[0] < 250 and res["n_valid_all"] == valid_labels[0]
    np.testing.assert_allclose(res["mean_samples"], means, rtol=1e-12)
    low, high = np.percentile(means, [2.5, 97.5])
    assert res["mean_ci_low"] == pytest.approx(low, rel=1e-12) and res["mean_ci_high"] == pytest.approx(high, rel=1e-12)


@pytest.mark.parametrize("n_datasets", [200])
def test_bootstrap_ci_coverage_on_binormal_scores(n_datasets):
    """95 % percentile intervals cover the true AUROC Phi(d / sqrt 2) at 0.90-0.99."""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    d = np.array([0.5, 1.0, 1.5])
    truth = norm.cdf(d / math.sqrt(2))
    n, prevalence = 400, 0.3
    counts = S.bootstrap_counts(n, 500, seed=12)
    covered, mean_covered = [], []
    for _ in range(n_datasets):
        y = rng.random((n, 3)) < prevalence
        s = rng.normal(size=(n, 3)) + d * y
        res = S.bootstrap_auroc(y, s, counts=counts)
        covered.append((res["ci_low"] <= truth) & (truth <= res["ci_high"]))
        mean_covered.append(res["mean_ci_low"] <= truth.mean() <= res["mean_ci_high"])
    coverage = np.mean(covered)
    print(f"coverage per label {np.mean(covered, axis=0)}, pooled {coverage:.3f}, mean {np.mean(mean_covered):.3f}")
    assert 0.90 <= coverage <= 0.99, coverage  # 600 intervals: SE of the rate ~ 0.009
    assert 0.88 <= np.mean(mean_covered) <= 0.995, np.mean(mean_covered)


def test_bootstrap_rejects_mismatched_counts():
    y, s = random_data(n=50)
    with pytest.raises(CxrError, match="bootstrap_counts"):
        S.bootstrap_auroc(y, s, counts=np.ones((49, 10), np.float32))


# ---------------------------------------------------------------- DeLong
def delong_by_definition(y, s):
    """DeLong 1988 structural components, O(m k) straight from the definition."""
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size


def test_delong_equals_definition_with_ties():
    y, s = random_data(n=400, seed=13)
    np.testing.assert_allclose(
        S.delong_auroc_variance(y, s), [delong_by_definition(y[:, c], s[:, c]) for c in range(L)], rtol=1e-10
    )


def test_delong_matches_bootstrap_variance_on_large_sample():
    rng = np.random.default_rng(14)
    n = 4000
    y = rng.random((n, 3)) < np.array([0.05, 0.2, 0.4])
    s = rng.normal(size=(n, 3)) + np.array([0.8, 1.2, 0.5]) * y
    delong = S.delong_auroc_variance(y, s)
    boot = S.bootstrap_auroc(y, s, n_boot=2000, seed=15)["std"] ** 2
    # 2000 resamples estimate a variance to ~ +-3 % (1 SE); allow 15 %.
    np.testing.assert_allclose(boot / delong, 1.0, atol=0.15)


# ---------------------------------------------------------------- reports
def test_epoch_metrics_equal_sklearn():
    y, s = random_data(seed=16)
    got = M.epoch_metrics(y, s, threshold=0.5)
    pred = (s >= 0.5).astype(int)
    aurocs = [roc_auc_score(y[:, c], s[:, c]) for c in range(L)]
    assert got["mean_auroc"] == pytest.approx(np.mean(aurocs), rel=1e-12)
    for c, name in enumerate(LABELS):
        assert got[f"auroc_{name}"] == pytest.approx(aurocs[c], rel=1e-12)
    per, macro, _, _ = sklearn_threshold_metrics(y, pred)
    assert got["recall"] == pytest.approx(macro["sensitivity"], rel=1e-12)
    for key in ("specificity", "f1", "ppv", "npv"):
        assert got[key] == pytest.approx(macro[key], rel=1e-12), key
    assert got["hamming"] == pytest.approx(hamming_loss(y, pred), rel=1e-12)
    assert all(isinstance(v, float) for v in got.values())


def test_summary_rows_equal_sklearn():
    y, s = random_data(seed=17)
    thresholds = M.tune_thresholds(y, s, "f1")
    table = M.summary(y, s, thresholds)
    assert list(table.index) == [*LABELS, "macro", "micro"]
    pred = (s >= thresholds).astype(int)
    per, macro, micro, _ = sklearn_threshold_metrics(y, pred)
    np.testing.assert_allclose(table.loc[list(LABELS), "auroc"], [roc_auc_score(y[:, c], s[:, c]) for c in range(L)])
    np.testing.assert_allclose(table.loc[list(LABELS), "f1"], per["f1"])
    np.testing.assert_array_equal(table.loc[list(LABELS), "n_pos"], y.sum(axis=0))
    assert table.loc["macro", "auroc"] == pytest.approx(roc_auc_score(y, s, average="macro"), rel=1e-12)
    assert table.loc["micro", "auroc"] == pytest.approx(roc_auc_score(y, s, average="micro"), rel=1e-12)
    assert table.loc["macro", "auprc"] == pytest.approx(average_precision_score(y, s, average="macro"), rel=1e-12)
    assert table.loc["micro", "auprc"] == pytest.approx(average_precision_score(y, s, average="micro"), rel=1e-12)
    for name in M.RATIO_METRICS:
        assert table.loc["macro", name] == pytest.approx(macro[name], rel=1e-12)
        assert table.loc["micro", name] == pytest.approx(micro[name], rel=1e-12)
    assert table.loc["micro", "exact_match"] == pytest.approx(accuracy_score(y, pred))
    assert table.attrs["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
