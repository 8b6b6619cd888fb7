"""`cxr-predict` through the user's commands: phantoms → pack → `cxr.train` (the shipped tiny and ood_ae
configs) → `cxr.evaluate` / `cxr.tools.ood threshold` / `cxr.tools.export`; then cxr-predict on
a folder mixing the test split's PNGs, DICOM copies of them and broken files. References: the
evaluator's predictions.parquet and the gate's own scoring through the loader (cxr.tools.ood.score_split)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_data import IDENTIFYING, dicom_bytes
from helpers import phantom_shards
from PIL import Image

from cxrbase.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def run(*args: str) -> None:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, **env},
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards of 64 px phantoms, a tiny classifier run, a gate run, the evaluator's test predictions, a package:
    each command's own ``main`` (shards, cxr.train, cxr.tools.ood, cxr.evaluate, cxr.tools.export) in this
    process, with the arguments a user types."""
    from cxr.evaluate import main as evaluate
    from cxr.tools.export import main as export
    from cxr.tools.ood import main as ood
    from cxr.train import main as train

    root = tmp_path_factory.mktemp("predict")
    shards = phantom_shards(root, 160, 64, 3, fractions="0.6,0.2,0.2", split_seed=0).shards
    common = [f"data.shards={shards}", "data.num_threads=0", "logging.progress=false", "train.epochs=1"]
    tiny, gate = ROOT / "cxr" / "configs" / "tiny.yaml", ROOT / "cxr" / "configs" / "ood_ae.yaml"
    assert train(["--config", str(tiny), "data.resolution=64", "model.stem_size=64", *common,
                  f"checkpoint.run_dir={root / 'run'}"]) == 0  # fmt: skip
    assert train(["--config", str(gate), "model.width=8", "model.code=4", *common,
                  f"checkpoint.run_dir={root / 'ood'}"]) == 0  # fmt: skip
    assert ood(["threshold", "--run", str(root / "ood"), "--shards", str(shards), "--percentile", "90"]) == 0
    assert evaluate(["--runs", str(root / "run"), "--shards", str(shards), "--split", "test", "--thresholds-from",
                     "val", "--bootstrap", "20", "--no-figures", "--out", str(root / "report")]) == 0  # fmt: skip
    assert export(["--run", str(root / "run"), "--ood", str(root / "ood"), "--out", str(root / "pkg"),
                   "--thresholds", str(root / "report" / "thresholds.json")]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def studies(trained):
    """The test split's PNGs, 8-bit DICOM copies of the first 6 (identity window) and two broken files."""
    folder = trained / "studies"
    folder.mkdir()
    pred = pd.read_parquet(trained / "report" / "predictions.parquet")
    keys = sorted(pred.loc[pred["split"] == "test", "key"].unique())
    for i, key in enumerate(keys):
        src = trained / "synth" / "images" / f"{key}.png"
        (folder / src.name).write_bytes(src.read_bytes())
        if i < 6:  # stored 8 bit, C=128 W=256 is the identity onto 0…255 (PS3.3 C.11.2.1.2.1)
            pixels = np.asarray(Image.open(src))
            photometric = "MONOCHROME1" if i % 2 else "MONOCHROME2"
            stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
            (folder / f"dicom_{key}").write_bytes(
                dicom_bytes(stored, bits_stored=8, photometric=photometric, WindowCenter=128, WindowWidth=256)
            )
    (folder / "broken.png").write_bytes((folder / f"{keys[0]}.png").read_bytes()[:300])
    (folder / "readme.txt").write_text("not an image")
    return folder, keys


def evaluator_probs(trained: Path) -> pd.DataFrame:
    pred = pd.read_parquet(trained / "report" / "predictions.parquet")
    rows = pred[(pred["split"] == "test") & (pred["member"] == "run")].set_index("key")
    return rows[[f"p_{label}" if f"p_{label}" in rows else label for label in LABELS]]


def predict(*args: str) -> None:
    run("-m", "cxr.tools.predict", "--no-progress", *args)


def key_of(file: str) -> str:
    name = Path(file).name
    return name.removeprefix("dicom_").removesuffix(".png")


def check_overlays(got: pd.DataFrame, out: Path, method: str) -> None:
    """One PNG of the image's size per positive decision of an accepted image, each linked from index.html;
    where the drawn map is zero the PNG shows the grey image itself (nothing blended in)."""
    want = []
    for i, row in got.iterrows():
        if row["gate"] != "rejected":
            want += [(i, row["file"], label) for label in LABELS if row[f"{label}_decision"] == 1]
    pngs = sorted((out / "overlays").glob("*.png")) if (out / "overlays").is_dir() else []
    assert len(pngs) == len(want) and want, (len(pngs), len(want))
    page = (out / "index.html").read_text()
    assert method in page and all(f"overlays/{p.name}" in page for p in pngs)
    for i, file, label in want[:3]:
        png = out / "overlays" / f"{i:05d}_{Path(file).stem}_{label}.png"
        source = np.asarray(Image.open(file).convert("L")) if not Path(file).name.startswith("dicom_") else None
        with Image.open(png) as im:
            drawn = np.asarray(im.convert("RGB")).astype(int)
        if source is not None:
            assert drawn.shape[:2] == source.shape
            line = max(6, round(drawn.shape[1] / 48))  # cxr.tools.explain.overlay's caption band: 2 lines of text
            band = int(1.35 * line * 2 + line * 0.4) + 1  # below it, a grey pixel (R = G = B) is the source's own
            grey = (drawn[band:, :, 0] == drawn[band:, :, 1]) & (drawn[band:, :, 1] == drawn[band:, :, 2])
            assert np.abs(drawn[band:, :, 0][grey] - source[band:][grey]).max() <= 1


def test_run_dir_predictions_equal_the_evaluators(trained, studies, tmp_path):
    folder, keys = studies
    out = tmp_path / "out"
    predict(
        "--model",
        str(trained / "run"),
        "--ood",
        str(trained / "ood"),
        str(folder),
        "--out",
        str(out),
        "--thresholds",
        str(trained / "report" / "thresholds.json"),
        "--overlays",
    )
    got = pd.read_csv(out / "predictions.csv")
    assert len(got) == len(keys) + 6  # every PNG and every DICOM; the broken files are not rows
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(Path(f).name for f in skipped["file"]) == ["broken.png", "readme.txt"]
    assert skipped["reason"].str.len().min() > 10
    ref = evaluator_probs(trained)
    raw = got.set_index(got["file"].map(key_of))[[f"raw_{label}" for label in LABELS]]
    np.testing.assert_allclose(raw.to_numpy(), ref.loc[raw.index].to_numpy(), atol=1e-4)
    # the gate: same scores as the gate's own scoring of the packed test split through the loader
    from cxr.tools.ood import read_threshold, score_split

    gate_keys, gate_scores = score_split(trained / "ood", trained / "shards", "test")
    by_key = dict(zip(gate_keys, gate_scores))
    np.testing.assert_allclose(got["gate_score"], [by_key[key_of(f)] for f in got["file"]], rtol=1e-4, atol=1e-6)
    threshold = read_threshold(trained / "ood")["threshold"]
    assert ((got["gate"] == "rejected") == (got["gate_score"] > threshold)).all()
    rejected = got[got["gate"] == "rejected"]
    assert rejected[[f"{label}_decision" for label in LABELS]].isna().all().all()  # no diagnosis
    check_overlays(got, out, "Grad-CAM")
    # no identifying header value anywhere in the outputs
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert not any(marker.encode() in blob for marker in IDENTIFYING.values())


def test_package_predictions_equal_the_evaluators(trained, studies, tmp_path):
    folder, keys = studies
    out = tmp_path / "out"
    predict("--model", str(trained / "pkg"), str(folder), "--out", str(out), "--overlays")
    got = pd.read_csv(out / "predictions.csv")
    got.index = got["file"].map(key_of)
    ref = evaluator_probs(trained)
    raw = got[[f"raw_{label}" for label in LABELS]]
    np.testing.assert_allclose(raw.to_numpy(), ref.loc[raw.index].to_numpy(), atol=1e-3)
    # label columns: the report's calibration (evaluated with --thresholds-from val, so the export packed
    # its calibration.json) written out by hand from the stored parameters; decisions at the operating point
    import json

    ops = np.asarray(json.loads((trained / "pkg" / "thresholds.json").read_text())["operating_points"])
    maps = json.loads((trained / "pkg" / "calibration.json").read_text())["labels"]
    x = raw.to_numpy()

    def by_hand(p: np.ndarray) -> np.ndarray:
        q = np.clip(p, 1e-7, 1 - 1e-7)
        logit = np.log(q / (1 - q))
        z = {
            "none": lambda j, e: p[:, j],
            "temperature": lambda j, e: 1 / (1 + np.exp(-logit[:, j] / e["temperature"])),
            "platt": lambda j, e: 1 / (1 + np.exp(-(e["a"] * logit[:, j] + e["b"]))),
        }
        return np.column_stack([z[maps[label]["method"]](j, maps[label]) for j, label in enumerate(LABELS)])

    assert (got["probabilities"] == "calibrated").all()
    # raw_ is printed to 8 decimals, the label to 6: the shown value lies in the (increasing) map's image
    # of the raw value's rounding interval
    shown = got[list(LABELS)].to_numpy()
    lo, hi = by_hand(np.clip(x - 5e-9, 0, 1)) - 5.1e-7, by_hand(np.clip(x + 5e-9, 0, 1)) + 5.1e-7
    assert ((shown >= lo) & (shown <= hi)).all(), (shown, lo, hi)
    check_overlays(got.reset_index(drop=True), out, "CAM")
    accepted = got["gate"] == "accepted"
    decisions = got.loc[accepted, [f"{label}_decision" for label in LABELS]].to_numpy()
    np.testing.assert_array_equal(decisions, (x[accepted.to_numpy()] >= ops).astype(int))
    from cxr.tools.ood import score_split

    gate_keys, gate_scores = score_split(trained / "ood", trained / "shards", "test")
    by_key = dict(zip(gate_keys, gate_scores))
    np.testing.assert_allclose(got["gate_score"], [by_key[k] for k in got.index], rtol=1e-3, atol=1e-5)


def test_package_path_never_imports_torch(trained, studies, tmp_path):
    folder, _ = studies
    code = (
        "import sys, runpy; sys.argv = ['cxr-predict', '--no-progress', '--model', sys.argv[1], sys.argv[2], "
        "'--out', sys.argv[3]]\ntry:\n    runpy.run_module('cxr.tools.predict', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(trained / "pkg"), str(folder), str(tmp_path / "o")],
        check=True,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
