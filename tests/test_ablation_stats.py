"""Paired comparison statistics (cxr.evaluation.metrics) against independent references.

References: SPEC.md's O(m·n) ψ definition of DeLong's paired test written out here;
scikit-learn's roc_auc_score; Holm's procedure computed by hand (and statsmodels'
multipletests when it is installed).
"""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxr.evaluation.stats import bootstrap_counts, holm, paired_bootstrap_delta, paired_delong


def delong_definition(y, s1, s2):
    """Straightforward O(m·n) DeLong from the ψ kernel (SPEC.md), two models."""
    y = np.asarray(y).astype(bool)
    v10, v01 = [], []
    for s in (s1, s2):
        x, yy = s[y], s[~y]
        psi = (x[:, None] > yy[None, :]) + 0.5 * (x[:, None] == yy[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = len(v10[0]), len(v01[0])
    theta = [v.mean() for v in v10]
    s10 = np.cov(np.stack(v10))
    s01 = np.cov(np.stack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (theta[0] - theta[1]) / np.sqrt(var)
    return theta, var, z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", range(5))
def test_fast_delong_equals_definition_on_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y = rng.random(n) < rng.uniform(0.1, 0.6)
    y[:2] = [True, False]
    # few distinct values: ties within and across classes, correlated models
    s1 = np.round(rng.random(n) + 0.6 * y, 1)
    s2 = np.round(0.5 * s1 + rng.random(n) * 0.7 + 0.2 * y, 1)
    got = paired_delong(y, s1, s2)
    theta, var, z, p = delong_definition(y, s1, s2)
    assert got["auc_1"] == pytest.approx(theta[0], abs=1e-12)
    assert got["auc_2"] == pytest.approx(theta[1], abs=1e-12)
    assert got["auc_1"] == pytest.approx(roc_auc_score(y, s1), abs=1e-12)
    assert got["var"] == pytest.approx(var, rel=1e-9)
    assert got["z"] == pytest.approx(z, rel=1e-9)
    assert got["p"] == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_delong_identical_models_and_undefined():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.3, 0.4, 0.8, 0.2])
    same = paired_delong(y, s, s)
    assert same["delta"] == 0 and same["p"] == 1.0
    assert np.isnan(paired_delong(np.zeros(6), s, s[::-1])["p"])


def test_holm_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted defined: 0.005 (x4) 0.01 (x3) 0.03 (x2) 0.04 (x1) -> 0.02, 0.03, 0.06, 0.06 (monotone)
    expected = np.array([0.03, 0.06, 0.06, 0.02, np.nan])
    np.testing.assert_allclose(holm(p), expected, equal_nan=True)
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).random(14) ** 3
    np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1])


def test_paired_bootstrap_uses_shared_resamples():
    rng = np.random.default_rng(0)
    n = 150
    y = (rng.random((n, 2)) < 0.3).astype(int)
    s1 = rng.random((n, 2)) + y
    s2 = s1 + 0.01 * rng.random((n, 2))
    counts = bootstrap_counts(n, 200, seed=1)
    out = paired_bootstrap_delta(y, s1, s2, counts=counts)
    for c in range(2):
        assert out["delta"][c] == pytest.approx(roc_auc_score(y[:, c], s1[:, c]) - roc_auc_score(y[:, c], s2[:, c]))
        # replicate 0 by hand: repeat each image by its count
        idx = np.repeat(np.arange(n), counts[:, 0].astype(int))
        ref = roc_auc_score(y[idx, c], s1[idx, c]) - roc_auc_score(y[idx, c], s2[idx, c])
        assert out["samples"][0, c] == pytest.approx(ref, abs=1e-9)
    # nearly identical models: paired CI is narrow around ~0
    assert (out["ci_high"] - out["ci_low"] < 0.05).all()


def test_analyse_sweep_seeds_and_holm_against_references(tmp_path):
    """Two resolutions × two seeds on random scores: variant AUROC = sklearn on the seeds' mean
    probability, mean ± sd across seeds = numpy on sklearn AUROCs, Holm p = hand Holm of the
    O(m·n) DeLong p-values."""
    from cxr.evaluation.scores import ScoreSet
    from cxr.tools.ablation import ALL, Run, analyse_sweep
    from cxrbase.labels import LABELS

    rng = np.random.default_rng(7)
    n = 120
    y = (rng.random((n, 14)) < 0.3).astype(np.uint8)
    y[:2, :] = [[1] * 14, [0] * 14]
    runs, scores = [], {}
    for res in (32, 64):
        for seed in (0, 1):
            name = f"res{res}_seed{seed}"
            scores[name] = np.clip(rng.random((n, 14)) * 0.8 + y * (0.1 if res == 32 else 0.4), 0, 1)
            runs.append(Run(name, tmp_path / name, res, seed, {}))
    result = analyse_sweep(ScoreSet(np.arange(n).astype(str).astype(object), y, scores), runs, n_boot=50)
    table = result["table"]
    assert result["order"] == ["32", "64"] and result["reference"] == "32"
    mean64 = (scores["res64_seed0"] + scores["res64_seed1"]) / 2
    mean32 = (scores["res32_seed0"] + scores["res32_seed1"]) / 2
    rows = table[table.variant == "64"].set_index("label")
    p_ref = []
    for c, label in enumerate(LABELS):
        assert rows.loc[label, "auroc"] == pytest.approx(roc_auc_score(y[:, c], mean64[:, c]), abs=1e-12)
        single = [roc_auc_score(y[:, c], scores[f"res64_seed{s}"][:, c]) for s in (0, 1)]
        assert rows.loc[label, "seeds_mean"] == pytest.approx(np.mean(single), abs=1e-12)
        assert rows.loc[label, "seeds_sd"] == pytest.approx(np.std(single, ddof=1), abs=1e-12)
        p_ref.append(delong_definition(y[:, c], mean64[:, c], mean32[:, c])[3])
    p_ref = np.array(p_ref)
    order = np.argsort(p_ref)
    holm_ref = np.empty(14)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (14 - i) * p_ref[j]))
        holm_ref[j] = running
    np.testing.assert_allclose(rows.loc[list(LABELS), "p"].to_numpy(float), p_ref, rtol=1e-9)
    np.testing.assert_allclose(rows.loc[list(LABELS), "p_holm"].to_numpy(float), holm_ref, rtol=1e-9)
    assert rows.loc["Nodule", "significant"] == (holm_ref[LABELS.index("Nodule")] < 0.05)
    everything = np.mean(list(scores.values()), axis=0)
    all_rows = table[table.variant == ALL].set_index("label")
    assert all_rows.loc["Edema", "auroc"] == pytest.approx(
        roc_auc_score(y[:, LABELS.index("Edema")], everything[:, LABELS.index("Edema")]), abs=1e-12
    )
