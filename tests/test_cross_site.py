"""Cross-site evaluation (`python -m cxr.evaluate --runs A_RUN --shards B_SHARDS --compare-to A_REPORT`):
a model trained on phantom site A scored on phantom site B, packed with other labels — one renamed
("Pleural Effusion", mapped to A's "Effusion" before packing as the harmonisation table does), one
A lacks (Nodule), one B lacks (Mass), one B has but never knows (Atelectasis, all blank) and one
single-class on B's test split (Hernia, all 0).

References: B's labels as this test wrote them (by key) and scikit-learn's roc_auc_score on the
saved probabilities; the internal AUROCs from A's own report's aucs.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sites import pack_site, synth, train_config
from sklearn.metrics import roc_auc_score

from cxr.evaluate import main as evaluate_main
from cxr.train import train

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]

MODEL_LABELS = ["Cardiomegaly", "Effusion", "Mass", "Atelectasis", "Hernia"]
RENAMED = {"Pleural Effusion": "Effusion"}  # B's name → the canonical (A's) name


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    phantoms = synth(root, 200, seed=5)
    images = root / "synth" / "images"
    half = len(phantoms) // 2
    a_rows, b_rows = phantoms.iloc[:half].reset_index(drop=True), phantoms.iloc[half:].reset_index(drop=True)
    (root / "a").mkdir(), (root / "b").mkdir()
    site_a = pack_site(root / "a", a_rows, {name: name for name in MODEL_LABELS}, images)
    b_rows = b_rows.assign(zero=0)
    # B as its own data set writes it: "Pleural Effusion"; the label mapping renames it on the way in
    b_columns = {"Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion", "Atelectasis": None}
    b_columns |= {"Hernia": "zero", "Nodule": "Nodule"}
    packed = {RENAMED.get(name, name): source for name, source in b_columns.items()}
    site_b = pack_site(root / "b", b_rows, packed, images, seed=1)
    run = root / "run_a"
    cfg = train_config(run, site_a.shards, "train.epochs=2", f"model.num_labels={len(MODEL_LABELS)}")
    assert train(cfg) == 0
    internal = root / "report_a"
    args = ["--runs", str(run), "--shards", str(site_a.shards), "--bootstrap", "50", "--no-figures"]
    assert evaluate_main([*args, "--out", str(internal)]) == 0
    return site_a, site_b, run, internal


def test_external_aurocs_on_the_shared_labels_equal_sklearn_and_dropped_labels_are_named(tmp_path, sites, capsys):
    _, site_b, run, internal = sites
    out = tmp_path / "external"
    capsys.readouterr()
    args = ["--runs", str(run), "--shards", str(site_b.shards), "--bootstrap", "50", "--no-figures"]
    assert evaluate_main([*args, "--compare-to", str(internal), "--out", str(out)]) == 0
    said = capsys.readouterr()
    dropped = {
        "Mass": "absent in the shards",
        "Nodule": "not predicted by the model",
        "Atelectasis": "all-unknown",
        "Hernia": "single class",
    }
    for label, why in dropped.items():
        assert f"{label} ({why})" in said.err + said.out, label
    shared = ["Cardiomegaly", "Effusion"]
    aucs = pd.read_csv(out / "aucs.csv")
    assert list(dict.fromkeys(aucs["label"])) == [*shared, "mean"]
    preds = pd.read_parquet(out / "predictions.parquet")
    test = preds[(preds["split"] == "test") & (preds["member"] == "ensemble")]
    ext = aucs[aucs["member"] == "ensemble"].set_index("label")
    for label in shared:
        truth = site_b.truth.loc[test["key"], label].to_numpy()  # what this test wrote for site B
        assert 0 < truth.sum() < len(truth)
        assert ext.loc[label, "auroc"] == pytest.approx(roc_auc_score(truth, test[label]), abs=1e-12)
    # internal vs external side by side, paired by label
    internal_aucs = pd.read_csv(internal / "aucs.csv")
    inner = internal_aucs[internal_aucs["member"] == "ensemble"].set_index("label")
    table = pd.read_csv(out / "cross_site.csv", keep_default_na=False, na_values=[""]).set_index("label")
    assert list(table.index) == [*shared, "mean", *dropped]
    assert table.loc[list(dropped), "dropped"].tolist() == list(dropped.values())
    for label in shared:
        assert table.loc[label, "internal_auroc"] == pytest.approx(inner.loc[label, "auroc"], abs=1e-6)
        assert table.loc[label, "external_auroc"] == pytest.approx(ext.loc[label, "auroc"], abs=1e-6)
        assert table.loc[label, "delta"] == pytest.approx(ext.loc[label, "auroc"] - inner.loc[label, "auroc"], abs=2e-6)
    want_mean = np.mean([ext.loc[x, "auroc"] - inner.loc[x, "auroc"] for x in shared])
    assert table.loc["mean", "delta"] == pytest.approx(want_mean, abs=2e-6)
    report = (out / "report.md").read_text()
    assert "## External validation" in report and "Hernia (single class)" in report
    assert "| Effusion |" in report.split("## External validation")[1]


def test_a_model_and_shards_without_a_shared_label_is_a_one_line_error(tmp_path, sites, capsys):
    site_a, _, run, _ = sites
    phantoms = pd.DataFrame({"image": site_a.truth.index + ".png"})
    other = tmp_path / "other"
    other.mkdir()
    table = phantoms.assign(patient=range(len(phantoms)), Thing=[i % 2 for i in range(len(phantoms))])
    images = Path(site_a.shards).parent.parent / "synth" / "images"
    site = pack_site(other, table, {"Thing": "Thing"}, images)
    capsys.readouterr()
    args = ["--runs", str(run), "--shards", str(site.shards), "--bootstrap", "0", "--out", str(tmp_path / "r")]
    assert evaluate_main(args) != 0
    err = capsys.readouterr().err
    assert "share no name with the model's" in err and "manifest.json" in err


def test_the_manifest_records_the_site_labels_and_unknowns(sites):
    _, site_b, _, _ = sites
    manifest = json.loads((site_b.shards / "manifest.json").read_text())
    assert manifest["labels"] == ["Cardiomegaly", "Effusion", "Atelectasis", "Hernia", "Nodule"]
    assert all(stats["known"]["Atelectasis"] == 0 for stats in manifest["splits"].values())
    assert manifest["unknown_labels"] == len(site_b.truth)
