"""The resolution study end to end on phantoms: sweep 32/64/128 px → report → the science.

Phantoms at 128 px carry the fine-detail signature (`synth --fine-detail Nodule`: dots
~2 px wide) next to the coarse ones (Edema: a wide perihilar haze). References:
scikit-learn's roc_auc_score on the runs' saved predictions, and a straightforward
O(m·n) DeLong written here (not cxr.evaluation.metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import phantom_shards
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxrbase.labels import LABELS

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS = (32, 64, 128)


def delong_by_definition(y, a, b):
    """Two-sided p of DeLong's paired test from the ψ kernel, O(m·n)."""
    y = np.asarray(y).astype(bool)
    comps = []
    for s in (a, b):
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))
    (v10a, v01a), (v10b, v01b) = comps
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / y.sum() + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / (~y).sum()
    z = (v10a.mean() - v10b.mean()) / np.sqrt(var)
    return 2 * norm.sf(abs(z))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    from launch.submit import main as submit_main

    root = tmp_path_factory.mktemp("sweep")
    phantom_shards(
        root,
        700,
        128,
        5,
        workers=2,
        synth_args=("--fine-detail", "Nodule"),
        fractions="0.55,0.1,0.35",
        split_seed=1,
        pack_workers=1,
    )
    runs = root / "runs"
    assert (
        submit_main(
            [
                "ablate",
                "--cluster",
                "debug",
                "--config",
                str(ROOT / "cxr/configs/phantom_sweep.yaml"),
                "--shards",
                str(root / "shards"),
                "--runs",
                str(runs),
                "--no-probe",
                "--resolutions",
                *map(str, RESOLUTIONS),
            ]
        )
        == 0
    )
    report = runs / "report"
    preds = pd.read_parquet(report / "predictions.parquet")
    return {
        "root": root,
        "runs": runs,
        "report": report,
        "table": pd.read_csv(report / "ablation.csv"),
        "preds": preds[preds.split == "test"],
        "members": json.loads((report / "members.json").read_text()),
    }


def _auc(table, variant, label):
    return float(table[(table.variant.astype(str) == str(variant)) & (table.label == label)].auroc.iloc[0])


def _row(table, variant, label):
    return table[(table.variant.astype(str) == str(variant)) & (table.label == label)].iloc[0]


@pytest.mark.slow
def test_fine_detail_gains_with_resolution_coarse_flat(sweep):
    table = sweep["table"]
    nodule = [_auc(table, r, "Nodule") for r in RESOLUTIONS]
    assert nodule[2] > nodule[0] + 0.1 and nodule[1] >= nodule[0] - 0.03, nodule
    top = _row(table, 128, "Nodule")
    assert top.significant and top.p_holm < 0.05 and top.delta > 0
    # Edema: a bilateral perihilar haze ~10 % of the image wide — visible at every resolution
    coarse = _row(table, 128, "Edema")
    assert not coarse.significant and abs(coarse.delta) < 0.05, (coarse.delta, coarse.p_holm)
    assert (sweep["report"] / "ablation.md").is_file() and (sweep["report"] / "auroc_vs_resolution.png").is_file()


@pytest.mark.slow
def test_report_aurocs_and_delong_equal_independent_references(sweep):
    table, preds = sweep["table"], sweep["preds"]
    by_member = {m: g.sort_values("key") for m, g in preds.groupby("member")}
    ref = by_member["res32"]
    for r in RESOLUTIONS:
        g = by_member[f"res{r}"]
        assert (g.key.to_numpy() == ref.key.to_numpy()).all()
        for label in LABELS:
            y = g[f"true_{label}"].to_numpy()
            assert _auc(table, r, label) == pytest.approx(roc_auc_score(y, g[label]), abs=1e-12)
            if r != 32:
                p = delong_by_definition(y, g[label].to_numpy(), ref[label].to_numpy())
                assert _row(table, r, label).p == pytest.approx(p, rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_multi_resolution_ensemble_each_member_at_its_own(sweep, tmp_path):
    from cxr.evaluate import main as evaluate_main

    members = {m["name"]: m for m in sweep["members"]}
    assert {n: (m["train_resolution"], m["eval_resolution"]) for n, m in members.items()} == {
        f"res{r}": (r, r) for r in RESOLUTIONS
    }
    preds = sweep["preds"]
    wide = {m: g.sort_values("key")[list(LABELS)].to_numpy() for m, g in preds.groupby("member")}
    np.testing.assert_allclose(wide["ensemble"], np.mean([wide[f"res{r}"] for r in RESOLUTIONS], axis=0))
    assert _auc(sweep["table"], "ensemble of all", "mean") == pytest.approx(
        np.nanmean(
            [
                roc_auc_score(preds[preds.member == "ensemble"][f"true_{c}"], preds[preds.member == "ensemble"][c])
                for c in LABELS
            ]
        ),
        abs=1e-12,
    )
    # the 32 px member alone, in its own evaluator run at 32 px, scores the same
    out = tmp_path / "alone"
    assert (
        evaluate_main(
            [
                "--runs",
                str(sweep["runs"] / "res32"),
                "--shards",
                str(sweep["root"] / "shards"),
                "--out",
                str(out),
                "--thresholds-from",
                "none",
                "--bootstrap",
                "0",
                "--no-figures",
            ]
        )
        == 0
    )
    alone = pd.read_parquet(out / "predictions.parquet")
    alone = alone[alone.member == "res32"].sort_values("key")[list(LABELS)].to_numpy()
    np.testing.assert_allclose(wide["res32"], alone, atol=1e-6)
    costs = pd.read_csv(sweep["report"] / "runs.csv")
    assert (costs.effective_batch == costs.effective_batch.iloc[0]).all()
    assert costs.images_per_s.gt(0).all() and costs.peak_memory_mb.gt(0).all()
