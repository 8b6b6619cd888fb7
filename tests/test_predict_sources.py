"""cxr-predict on source files that need the whole preprocessing path — a 12-bit windowed MONOCHROME1 DICOM,
an RGBA PNG, grey PNGs of other sizes than the model's — against the evaluator on the same files packed into
shards (`shards pack` → `cxr.evaluate`), to 1e-5 for run dirs. Neither reference goes through cxr-predict's
code: pack + the loader decide the pixels there. Also the package (its ONNX graphs and preprocess.json) and the
gate's own scoring of the packed split (cxr.tools.ood.score_split)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dicom_data import IDENTIFYING, dicom_bytes
from PIL import Image

from cxrbase.labels import LABELS

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def _phantom_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth structure plus noise, so a resize filter's choice shows in the pixels."""
    coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-25, 26, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def packed(export_runs, tmp_path_factory):
    """Source files → labelled table → splits (all test) → pack → evaluator's predictions of the two members."""
    from cxr.evaluate import main as evaluate_main
    from shards.cli import main as shards_main
    from shards.metadata import read_labelled_csv

    root = tmp_path_factory.mktemp("sources")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(_phantom_like(rng, 90, 113)).save(src / "grey_113x90.png")
    Image.fromarray(_phantom_like(rng, 64, 64)).save(src / "grey_64.png")
    Image.fromarray(_phantom_like(rng, 200, 200)).save(src / "grey_200.png")
    grey = _phantom_like(rng, 80, 80)
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]), "RGBA").save(src / "rgba_80.png")
    # 12-bit stored, MONOCHROME1, a window that clips both ends, rescale slope 2 (PS3.3 C.11.2.1.2)
    stored = (_phantom_like(rng, 96, 70).astype(np.uint16) * 16 + rng.integers(0, 16, (96, 70))).astype(np.uint16)
    (src / "mono1.dcm").write_bytes(
        dicom_bytes(
            stored,
            bits_stored=12,
            photometric="MONOCHROME1",
            RescaleSlope=2,
            RescaleIntercept=-100,
            WindowCenter=4000,
            WindowWidth=6000,
        )
    )
    stored = (_phantom_like(rng, 72, 72).astype(np.uint16) * 16).astype(np.uint16)
    (src / "mono2_noext").write_bytes(dicom_bytes(stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096))
    names = sorted(p.name for p in src.iterdir())
    table = pd.DataFrame({"image": names})
    for j, label in enumerate(LABELS):  # both classes in every label (the evaluator's AUROC needs them)
        table[label] = [(i + j) % 2 for i in range(len(names))]
    table.to_csv(root / "labels.csv", index=False)
    splits = read_labelled_csv(root / "labels.csv").assign(split="test")
    splits.to_parquet(root / "splits.parquet", index=False)
    shards = root / "shards"
    args = ["pack", "--splits", str(root / "splits.parquet"), "--images", str(src), "--out", str(shards)]
    assert shards_main([*args, "--workers", "1"]) == 0
    members = export_runs["members"]
    report = root / "report"
    args = ["--runs", *map(str, members), "--shards", str(shards), "--split", "test", "--out", str(report)]
    assert evaluate_main([*args, "--thresholds-from", "none", "--bootstrap", "0", "--no-figures"]) == 0
    pred = pd.read_parquet(report / "predictions.parquet")
    assert set(pred["key"]) == {n.removesuffix(".png").removesuffix(".dcm") for n in names}, "pack dropped a file"
    return {"src": src, "shards": shards, "pred": pred, "root": root}


def _reference(pred: pd.DataFrame, members) -> pd.DataFrame:
    """Mean of the members' probabilities per key (cxr.evaluate's default ensemble), from predictions.parquet."""
    rows = pred[pred["member"].isin([m.name for m in members])]  # run dir names (cxr.evaluation.inference.member_names)
    assert rows["member"].nunique() == len(members)
    cols = [f"p_{label}" if f"p_{label}" in rows else label for label in LABELS]
    return rows.groupby("key")[cols].mean()


def _key(file: str) -> str:
    from pathlib import Path

    return Path(file).name.removesuffix(".png").removesuffix(".dcm")


def _predict(tmp_path, *args: str) -> pd.DataFrame:
    from cxr.tools.predict import main as predict_main

    assert predict_main(["--no-progress", "--out", str(tmp_path / "out"), *args]) == 0
    got = pd.read_csv(tmp_path / "out" / "predictions.csv")
    return got.set_index(got["file"].map(_key))


def test_run_dirs_equal_the_evaluator_on_packed_copies(export_runs, packed, tmp_path):
    members = export_runs["members"]
    got = _predict(
        tmp_path,
        *[a for m in members for a in ("--model", str(m))],
        "--ood",
        str(export_runs["gate"]),
        str(packed["src"]),
    )
    ref = _reference(packed["pred"], members)
    assert sorted(got.index) == sorted(ref.index)
    raw = got[[f"raw_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(raw, ref.loc[got.index].to_numpy(), atol=1e-5, rtol=0)
    from cxr.tools.ood import score_split

    keys, scores = score_split(export_runs["gate"], packed["shards"], "test")
    np.testing.assert_allclose(got.loc[keys, "gate_score"], scores, rtol=1e-5, atol=1e-6)
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert not any(marker.encode() in blob for marker in IDENTIFYING.values())


def test_package_equals_the_evaluator_on_packed_copies(export_runs, packed, tmp_path):
    from cxr.tools.export import main as export_main

    members = export_runs["members"]
    pkg = tmp_path / "pkg"
    args = [*[a for m in members for a in ("--run", str(m))], "--ood", str(export_runs["gate"]), "--out", str(pkg)]
    assert export_main([*args, "--thresholds", str(export_runs["report"] / "thresholds.json")]) == 0
    got = _predict(tmp_path, "--model", str(pkg), str(packed["src"]))
    ref = _reference(packed["pred"], members)
    raw = got[[f"raw_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(raw, ref.loc[got.index].to_numpy(), atol=1e-5, rtol=0)
    from cxr.tools.ood import score_split

    keys, scores = score_split(export_runs["gate"], packed["shards"], "test")
    np.testing.assert_allclose(got.loc[keys, "gate_score"], scores, rtol=1e-4, atol=1e-5)
