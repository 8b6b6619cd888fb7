"""Unknown and uncertain labels (issue 26): a labelled CSV with empty cells (unknown) and -1
(uncertain) goes through `shards split` and `shards pack --uncertain ...` into `.labels` bytes
with 255 for a masked entry; the manifest counts only known entries.

References: the label cells this test writes into the CSV, by hand (no code under test
computes the expectation), and the raw tar members read with the standard library's tarfile.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import png_bytes

from cxrbase.labels import UNKNOWN
from shards.cli import main as shards_main

# image, A, B, C — "" unknown, -1 uncertain (C is a label this "data set" lacks for some images)
ROWS = [
    ("p00.png", "1", "0", ""),
    ("p01.png", "0", "-1", ""),
    ("p02.png", "1", "1", "0"),
    ("p03.png", "0", "", "1"),
    ("p04.png", "-1", "0", "1"),
    ("p05.png", "0", "0", ""),
    ("p06.png", "1", "-1", "0"),
    ("p07.png", "", "1", "0"),
]
NAMES = ("A", "B", "C")


def _expected(cell: str, policy: str) -> int:
    """A table cell → the `.labels` byte under an --uncertain policy, by hand."""
    if cell == "":
        return UNKNOWN
    if cell == "-1":
        return {"ignore": UNKNOWN, "zeros": 0, "ones": 1}[policy]
    return int(cell)


def _write_csv(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, *_ in ROWS:
        (images / name).write_bytes(png_bytes(rng.integers(0, 255, (32, 32), dtype=np.uint8)))
    lines = ["image,A,B,C,patient"] + [f"{n},{a},{b},{c},{i}" for i, (n, a, b, c) in enumerate(ROWS)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _split_and_pack(root: Path, policy: str | None) -> Path:
    csv = _write_csv(root) if not (root / "labels.csv").exists() else root / "labels.csv"
    if not (root / "splits.csv").exists():
        args = ["split", "--metadata", str(csv), "--scheme", "random", "--fractions", "0.5,0.25,0.25"]
        assert shards_main([*args, "--seed", "0", "--out", str(root / "splits.csv")]) == 0
    out = root / f"shards-{policy}"
    extra = [] if policy is None else ["--uncertain", policy]
    args = ["pack", "--splits", str(root / "splits.csv"), "--images", str(root / "images")]
    assert shards_main([*args, "--out", str(out), "--workers", "1", *extra]) == 0
    return out


def _members(shards: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.integration  # splits and packs shards (CONTRIBUTING.md)
@pytest.mark.parametrize("policy", [None, "ignore", "zeros", "ones"])
def test_pack_writes_255_for_unknown_and_resolves_uncertain_by_policy(tmp_path, policy):
    shards = _split_and_pack(tmp_path, policy)
    effective = policy or "ignore"  # the default is the CheXpert paper's U-Ignore
    members = _members(shards)
    assert sorted(members) == sorted(n.removesuffix(".png") for n, *_ in ROWS)
    for name, *cells in ROWS:
        got = members[name.removesuffix(".png")]
        want = [_expected(c, effective) for c in cells]
        assert list(got["labels"]) == want, name
        record = json.loads(got["json"])
        assert record["labels"] == [None if y == UNKNOWN else y for y in want]
        assert record["findings"] == [n for n, y in zip(NAMES, want) if y == 1]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["uncertain"] == effective
    splits = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str})
    unknown = 0
    for split, stats in manifest["splits"].items():
        rows = [cells for n, *cells in ROWS if n in set(splits.loc[splits["split"] == split, "image"])]
        for c, label in enumerate(NAMES):
            values = [_expected(r[c], effective) for r in rows]
            pos, known = sum(v == 1 for v in values), sum(v != UNKNOWN for v in values)
            unknown += len(values) - known
            assert stats["positives"][label] == pos
            assert stats["known"][label] == known
            assert stats["prevalence"][label] == (round(pos / known, 6) if known else None)
    assert manifest["unknown_labels"] == unknown
    from shards.verify import verify

    report = verify(shards, workers=1)  # .labels vs .json, findings, positives and known per split
    assert report.ok, report.failures


@pytest.mark.integration  # splits and packs shards (CONTRIBUTING.md)
def test_split_table_keeps_unknown_and_uncertain_cells(tmp_path):
    _split_and_pack(tmp_path, "ignore")
    table = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str}).set_index("image")
    for name, *cells in ROWS:
        for label, cell in zip(NAMES, cells):
            value = table.at[name, label]
            assert np.isnan(value) if cell == "" else value == int(cell), (name, label, value)


@pytest.mark.integration  # splits and packs shards (CONTRIBUTING.md)
def test_stats_counts_prevalence_over_known_images(tmp_path, capsys):
    _split_and_pack(tmp_path, "ignore")
    capsys.readouterr()
    assert shards_main(["stats", str(tmp_path / "splits.csv"), "--format", "csv"]) == 0
    got = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    splits = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str})
    for split in got["split"].unique():
        rows = [cells for n, *cells in ROWS if n in set(splits.loc[splits["split"] == split, "image"])]
        for c, label in enumerate(NAMES):
            line = got[(got["split"] == split) & (got["label"] == label)].iloc[0]
            known = [r[c] for r in rows if r[c] in ("0", "1")]  # uncertain is not known either
            assert line["images"] == len(known)
            assert line["positives"] == known.count("1")


@pytest.mark.integration  # splits and packs shards (CONTRIBUTING.md)
def test_a_label_value_outside_1_0_minus1_blank_is_a_one_line_error(tmp_path, capsys):
    csv = _write_csv(tmp_path)
    csv.write_text(csv.read_text().replace("p03.png,0,,1", "p03.png,0,2,1"))
    assert shards_main(["split", "--metadata", str(csv), "--scheme", "random", "--out", str(tmp_path / "s.csv")]) != 0
    assert "labels.csv: line 5 (p03.png): B '2' is not 1, 0, -1 (uncertain) or empty" in capsys.readouterr().err
    table = pd.DataFrame(
        {
            "image": ["a.png"],
            "patient": [1],
            "split": ["train"],
            "A": [0.5],
            "age": [None],
            "sex": [None],
            "view": [None],
        }
    )
    table.to_csv(tmp_path / "bad.csv", index=False)
    args = ["pack", "--splits", str(tmp_path / "bad.csv"), "--images", str(tmp_path / "images")]
    assert shards_main([*args, "--out", str(tmp_path / "o"), "--workers", "1"]) != 0
    assert "a label value other than 1, 0, -1 (uncertain) or empty" in capsys.readouterr().err


# ------------------------------------------------------------------ read side: losses and metrics
def _masked_batch(seed: int = 0, n: int = 24, c: int = 4):
    """Logits, 0/1 targets, and the same targets with ~30 % of entries NaN (unknown)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(n, c, generator=g) < 0.4).double()
    unknown = torch.rand(n, c, generator=g) < 0.3
    unknown[0] = False  # every label keeps some known entries
    return z, y, torch.where(unknown, torch.full_like(y, float("nan")), y), ~unknown


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def test_masked_bce_equals_a_hand_computation_with_the_masked_terms_removed():
    from cxr.models.losses import bce

    z, y, masked, known = _masked_batch()
    zn, yn, k = z.numpy(), y.numpy(), known.numpy()
    terms = -(yn * _log_sigmoid(zn) + (1 - yn) * _log_sigmoid(-zn))
    want = terms[k].sum() / k.sum()  # hand: mean over the known (image, label) pairs only
    assert float(bce(z, masked)) == pytest.approx(want, rel=1e-12)
    assert float(bce(z, masked)) != pytest.approx(float(terms.mean()), rel=1e-6)  # the mask changes it
    assert float(bce(z, y)) == pytest.approx(float(terms.mean()), rel=1e-12)  # without NaN: unchanged


def test_every_loss_skips_masked_entries_hand_computed():
    from cxr.models.losses import dynamic_weighted_bce, focal, weighted_bce

    z, y, masked, known = _masked_batch(seed=1)
    zn, yn, k = z.numpy(), y.numpy(), known.numpy()
    lp, lq = _log_sigmoid(zn), _log_sigmoid(-zn)
    w = np.array([1.5, 3.0, 0.7, 2.0])
    terms = -(w * yn * lp + (1 - yn) * lq)
    assert float(weighted_bce(z, masked, w)) == pytest.approx(terms[k].sum() / k.sum(), rel=1e-12)
    gamma, alpha = 2.0, 0.25
    p = 1 / (1 + np.exp(-zn))
    terms = -(alpha * yn * (1 - p) ** gamma * lp + (1 - alpha) * (1 - yn) * p**gamma * lq)
    got = float(focal(z, masked, gamma=gamma, alpha=alpha))
    assert got == pytest.approx(terms[k].sum() / k.sum(), rel=1e-10)
    # dynamic weights: r_c = positives / images that KNOW label c (SPEC's batch ratio over known entries)
    s, eps = 0.1, 1e-7
    r = np.array([yn[k[:, c], c].mean() for c in range(yn.shape[1])])
    rs = r * (1 - s) + 0.5 * s
    terms = -(yn / (rs + eps) * lp + (1 - yn) / (1 - rs + eps) * lq)
    got = float(dynamic_weighted_bce(z, masked, smoothing=s, eps=eps))
    assert got == pytest.approx(terms[k].sum() / k.sum(), rel=1e-10)


def test_masked_losses_have_zero_gradient_on_masked_logits_and_no_nan():
    import torch

    from cxr.models.losses import LossConfig, build_loss

    z, _, masked, known = _masked_batch(seed=2)
    prevalence = np.full(z.shape[1], 0.3)
    for name in ("bce", "weighted_bce", "dynamic_weighted_bce", "focal"):
        logits = z.clone().requires_grad_(True)
        loss = build_loss(LossConfig(name=name), prevalence)(logits, masked)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), name
        assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).any(), name


def test_per_label_metrics_skip_unknown_entries_as_sklearn_on_the_known_rows():
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    from cxr.evaluation.metrics import (
        per_label_auprc,
        per_label_auroc,
        summary,
        threshold_metrics,
        tune_thresholds,
    )
    from cxr.evaluation.stats import bootstrap_auroc, bootstrap_counts

    rng = np.random.default_rng(3)
    n, c = 200, 3
    y = (rng.random((n, c)) < 0.35).astype(np.float64)
    s = np.clip(0.3 * y + rng.random((n, c)) * 0.7, 0, 1)
    y[rng.random((n, c)) < 0.4] = np.nan
    k = ~np.isnan(y)
    want_auc = [roc_auc_score(y[k[:, j], j], s[k[:, j], j]) for j in range(c)]
    np.testing.assert_allclose(per_label_auroc(y, s), want_auc, rtol=1e-12)
    want_ap = [average_precision_score(y[k[:, j], j], s[k[:, j], j]) for j in range(c)]
    np.testing.assert_allclose(per_label_auprc(y, s), want_ap, rtol=1e-12)
    tm = threshold_metrics(y, s, 0.5)
    for j in range(c):
        tn, fp, fn, tp = confusion_matrix(y[k[:, j], j], s[k[:, j], j] >= 0.5, labels=[0, 1]).ravel()
        assert (tm["tp"][j], tm["fp"][j], tm["tn"][j], tm["fn"][j]) == (tp, fp, tn, fn)
    table = summary(y, s, tune_thresholds(y, s))
    np.testing.assert_allclose(table["prevalence"].to_numpy()[:c], np.nanmean(y, axis=0), rtol=1e-12)
    # bootstrap: each resample's AUROC of a masked label = sklearn's weighted AUROC on its known rows
    counts = bootstrap_counts(n, 5, seed=1)
    boot = bootstrap_auroc(y, s, counts=counts)
    for b in range(5):
        for j in range(c):
            rows = k[:, j]
            want = roc_auc_score(y[rows, j], s[rows, j], sample_weight=counts[rows, b])
            assert boot["samples"][b, j] == pytest.approx(want, rel=1e-9)


# ------------------------------------------------ two data sets with disjoint labels, trained as one
SITE_A = ("Cardiomegaly", "Effusion")  # labels only site A's images know
SITE_B = ("Mass", "Nodule")  # labels only site B's images know


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    """Phantoms of two "sites" in ONE labelled CSV: site A's rows leave B's labels blank and vice
    versa (unknown, not negative), split and packed into one shard set."""
    import sites

    root = tmp_path_factory.mktemp("union")
    phantoms = sites.synth(root, 160, seed=9)
    table = phantoms.copy().astype({name: float for name in (*SITE_A, *SITE_B)})
    site_b = np.arange(len(table)) % 2 == 1  # alternate patients between the sites
    table.loc[site_b, list(SITE_A)] = np.nan
    table.loc[~site_b, list(SITE_B)] = np.nan
    packed = sites.pack_site(root, table, {name: name for name in (*SITE_A, *SITE_B)}, root / "synth" / "images")
    return packed, site_b


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_both_loaders_give_nan_exactly_where_the_csv_was_blank(union, backend):
    from cxr.data import build_loader
    from cxr.data.config import DataConfig

    site, _ = union
    cfg = DataConfig(shards=str(site.shards), backend=backend, resolution=64, num_threads=1)
    seen = 0
    for split in ("train", "val", "test"):
        for batch in build_loader(cfg, split, train=False):
            labels = batch["labels"].numpy()
            assert labels.dtype == np.float32 and labels.shape[1] == len(SITE_A) + len(SITE_B)
            want = site.truth.loc[batch["key"], [*SITE_A, *SITE_B]].to_numpy()
            np.testing.assert_array_equal(labels, want.astype(np.float32))  # NaN where blank (equal_nan)
            seen += len(batch["key"])
    assert seen == len(site.truth)


class _KillAt:
    """build_loader's loader that sends this process SIGUSR1 before its ``at``-th batch."""

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        # iter() of the wrapped loader now, not at the first batch: the trainer builds the iterator
        # inside torch.random.fork_rng (a torch DataLoader draws its seed from the global RNG then)
        return self._batches(iter(self.loader))

    def _batches(self, batches):
        import os
        import signal

        for i, batch in enumerate(batches):
            if i == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, delivered mid-epoch
            yield batch


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("loss", ["bce", "dynamic_weighted_bce"])
def test_a_model_trained_on_two_sites_with_disjoint_labels_resumes_bitwise_and_evaluates(tmp_path, union, loss):
    import torch
    from safetensors.torch import load_file
    from sites import train_config
    from sklearn.metrics import roc_auc_score

    from cxr.data import build_loader
    from cxr.evaluate import main as evaluate_main
    from cxr.train import EXIT_REQUEUE, train

    site, _ = union
    # the shipped back end (DALI, CPU here) with one thread: its mid-epoch resume is bitwise in-process
    extra = ("train.epochs=2", "model.num_labels=4", f"loss.name={loss}", "data.backend=dali", "data.num_threads=1")
    assert train(train_config(tmp_path / "a", site.shards, *extra)) == 0
    state = {"killed": False}

    def killing_loader(cfg, split, **kw):
        loader = build_loader(cfg, split, **kw)
        kill = split == "train" and kw.get("epoch") == 1 and kw.get("skip_batches") == 0 and not state["killed"]
        state["killed"] |= kill
        return _KillAt(loader, 2) if kill else loader

    assert train(train_config(tmp_path / "b", site.shards, *extra), loader_fn=killing_loader) == EXIT_REQUEUE
    assert train(train_config(tmp_path / "b", site.shards, *extra)) == 0
    for name in ("last", "best"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point()), name
    metrics = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert np.isfinite(metrics["val_loss"]).all() and np.isfinite(metrics["val_mean_auroc"]).all()

    out = tmp_path / "report"
    args = ["--runs", str(tmp_path / "a"), "--shards", str(site.shards), "--bootstrap", "50", "--no-figures"]
    assert evaluate_main([*args, "--out", str(out)]) == 0
    preds = pd.read_parquet(out / "predictions.parquet")
    test = preds[(preds["split"] == "test") & (preds["member"] == "ensemble")]
    aucs = pd.read_csv(out / "aucs.csv")
    ens = aucs[aucs["member"] == "ensemble"].set_index("label")
    for label in (*SITE_A, *SITE_B):
        truth = site.truth.loc[test["key"], label].to_numpy()  # the CSV: NaN for the other site's images
        known = ~np.isnan(truth)
        assert 0 < known.sum() < len(truth)
        np.testing.assert_array_equal(test[f"true_{label}"].to_numpy(), truth)
        assert ens.loc[label, "auroc"] == pytest.approx(roc_auc_score(truth[known], test[label][known]), abs=1e-12)
        assert ens.loc[label, "n"] == known.sum() and ens.loc[label, "n_pos"] == truth[known].sum()
