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


def test_split_table_keeps_unknown_and_uncertain_cells(tmp_path):
    _split_and_pack(tmp_path, "ignore")
    table = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str}).set_index("image")
    for name, *cells in ROWS:
        for label, cell in zip(NAMES, cells):
            value = table.at[name, label]
            assert np.isnan(value) if cell == "" else value == int(cell), (name, label, value)


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
    from cxr.losses import bce

    z, y, masked, known = _masked_batch()
    zn, yn, k = z.numpy(), y.numpy(), known.numpy()
    terms = -(yn * _log_sigmoid(zn) + (1 - yn) * _log_sigmoid(-zn))
    want = terms[k].sum() / k.sum()  # hand: mean over the known (image, label) pairs only
    assert float(bce(z, masked)) == pytest.approx(want, rel=1e-12)
    assert float(bce(z, masked)) != pytest.approx(float(terms.mean()), rel=1e-6)  # the mask changes it
    assert float(bce(z, y)) == pytest.approx(float(terms.mean()), rel=1e-12)  # without NaN: unchanged


def test_every_loss_skips_masked_entries_hand_computed():
    from cxr.losses import dynamic_weighted_bce, focal, weighted_bce

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

    from cxr.losses import LossConfig, build_loss

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

    from cxr.metrics import (
        bootstrap_auroc,
        bootstrap_counts,
        per_label_auprc,
        per_label_auroc,
        summary,
        threshold_metrics,
        tune_thresholds,
    )

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
