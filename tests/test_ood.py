"""The OOD gate (cxr/tools/ood.py): SSIM against scikit-image, the val-percentile threshold, rejection
rates of natural-looking outliers vs held-out phantoms and real NIH images, and evaluate --ood."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_member, phantom_shards
from ood_data import MEAN, RES, STD, TEST_KINDS, digits, load_grey, normalise, textures, to_pixels
from PIL import Image

from cxr.config import load_config
from cxr.tools.ood import (
    FEATURES,
    GateScore,
    cross_fitted_distances,
    feature_distance,
    fit_feature_model,
    image_features,
    read_threshold,
    ssim_score,
    write_threshold,
)
from cxrbase.errors import CxrError

ROOT = Path(__file__).resolve().parents[1]
PERCENTILE = 95.0


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]  # conftest.py


# ------------------------------------------------------------------ SSIM ---
def test_ssim_score_equals_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).resize((64, 64)), np.float64) / 255
    pairs = [(a, np.clip(a + rng.normal(0, s, a.shape), 0, 1)) for s in (0.01, 0.1, 0.3)] + [(a, 1 - a)]
    for x, y in pairs:
        # Wang et al.'s Gaussian window (σ 1.5, 11×11), population covariance, valid region only
        ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        got = ssim_score(torch.tensor(x[None, None]), torch.tensor(y[None, None]))
        assert got.shape == (1,)
        # 1e-5: pytorch-msssim builds its Gaussian window in float32 (seen: 2e-6 apart)
        assert abs((1 - float(got[0])) - ref) < 1e-5, (float(got[0]), ref)


# ------------------------------------------------------------------ the gate's features and distance ---
def _features_numpy(x: np.ndarray, ae: np.ndarray) -> np.ndarray:
    """A second implementation of cxr.tools.ood.image_features in NumPy/SciPy (float64), from its docstring."""
    from scipy.ndimage import uniform_filter

    _, h, w = x.shape
    rows = []
    for img, a in zip(x, ae):
        e = 1 / (h * w)  # one pixel's share
        cuts = [
            np.log((p + e) / (1 - p + e)) for p in (np.mean(img < (k + 0.5) / 255) for k in (12, 63, 127, 191, 242))
        ]
        grad = np.abs(np.diff(img, axis=1)).mean() + np.abs(np.diff(img, axis=0)).mean()
        fine = np.abs(img - uniform_filter(img, 3, mode="constant"))[1:-1, 1:-1].mean()
        asym = np.abs(img[:, : w // 2] - np.fliplr(img)[:, : w // 2]).mean()
        q = w // 8
        centre = img[:, 3 * q : 5 * q].mean() - (img[:, q : 3 * q].mean() + img[:, 5 * q : 7 * q].mean()) / 2
        t = h // 3
        b = h // 16
        frame = np.ones_like(img, bool)
        frame[b : h - b, b : w - b] = False
        layout = img.reshape(4, h // 4, 4, w // 4).mean((1, 3)).ravel() - img.mean()
        rows.append(
            [
                np.log(a),
                img.mean(),
                img.std(),
                *cuts,
                grad,
                fine,
                asym,
                centre,
                img[h - t :].mean() - img[:t].mean(),
                img[frame].mean() - img.mean(),
                *layout,
            ]
        )
    return np.array(rows)


def test_image_features_equal_a_numpy_reimplementation():
    rng = np.random.default_rng(3)
    pixels = np.concatenate([textures(3, 4), digits(3, 5), rng.integers(0, 256, (2, RES, RES), dtype=np.uint8)])
    x01 = pixels.astype(np.float64) / 255
    ae = rng.uniform(0.05, 0.9, len(pixels))
    got = image_features(torch.tensor(x01[:, None]), torch.tensor(ae)).numpy()
    assert got.shape == (len(pixels), len(FEATURES))
    np.testing.assert_allclose(got, _features_numpy(x01, ae), rtol=1e-9, atol=1e-12)


def test_feature_distance_is_mahalanobis_under_the_ledoit_wolf_covariance():
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, len(FEATURES))) * rng.uniform(1, 3, len(FEATURES)) + rng.normal(size=len(FEATURES))
    model = fit_feature_model(train)
    centre, scale = train.mean(0), train.std(0)
    cov, _ = ledoit_wolf((train - centre) / scale)
    test = rng.normal(size=(5, len(FEATURES))) * 2
    want = [mahalanobis((t - centre) / scale, np.zeros(len(FEATURES)), np.linalg.inv(cov)) for t in test]
    np.testing.assert_allclose(feature_distance(test, model), want, rtol=1e-9)
    # the torch gate's whitening gives the same distance (float32)
    ae = __import__("cxr.tools.ood", fromlist=["OodAutoencoder"]).OodAutoencoder(width=4, code=4)
    gate = GateScore(ae, model)
    z = (torch.tensor(test, dtype=torch.float32) - gate.centre) / gate.scale
    np.testing.assert_allclose((z @ gate.whiten).pow(2).sum(1).sqrt().numpy(), want, rtol=1e-4)


def test_one_pixel_past_a_cut_no_fit_image_crosses_is_no_outlier():
    """No fit image has a pixel brighter than 242/255; an image like them with one such pixel lies
    among them, and one with a fifth of its pixels that bright beyond them all. (Without a floor on the
    log-odds' spread the one pixel put the image ~1400 standard deviations out; a gate fitted on the
    test phantoms then had a threshold in the thousands and the page accepted plots and documents.)"""
    rng = np.random.default_rng(5)
    px = np.clip(textures(41, 6).astype(np.int64), 20, 230).astype(np.float64) / 255
    one, many = px[40].copy(), px[40].copy()
    one[10, 10] = 250 / 255
    many[: RES // 5] = 250 / 255
    feats = image_features(
        torch.tensor(np.stack([*px[:40], one, many])[:, None]), torch.tensor(rng.uniform(0.1, 0.2, 42))
    )
    feats = feats.numpy()
    model = fit_feature_model(feats[:40])
    fit_images = np.sort(cross_fitted_distances(feats[:40]))
    near, far = feature_distance(feats[40:], model)
    assert near <= fit_images[-1], (near, fit_images[-5:])
    assert far > fit_images[-1], (far, fit_images[-5:])


def test_cross_fitted_distances_are_leave_one_out_for_small_sets():
    from cxr.tools.ood import cross_fitted_distances

    rng = np.random.default_rng(4)
    feats = rng.normal(size=(15, len(FEATURES))) + rng.normal(size=len(FEATURES))
    loo = [feature_distance(feats[i : i + 1], fit_feature_model(np.delete(feats, i, 0)))[0] for i in range(len(feats))]
    np.testing.assert_allclose(cross_fitted_distances(feats), loo, rtol=1e-12)
    # an unseen image lies further out than the images the model was fitted on
    assert np.median(loo) > np.median(feature_distance(feats, fit_feature_model(feats)))


def test_a_threshold_file_without_a_feature_model_is_refused(tmp_path):
    (tmp_path / "ood_threshold.json").write_text(json.dumps({"threshold": 0.3, "percentile": 99.0}))
    with pytest.raises(CxrError, match="no feature model .* cxr.tools.ood threshold"):
        read_threshold(tmp_path)


def test_gate_rejects_every_kind_of_non_x_ray_at_a_threshold_fitted_on_real_images(nih_sample_dir):
    """A small gate on the 130 real images (an AE trained for 30 steps here, features fitted on 70 of
    them, threshold = the largest distance of 30 others): every generated non-X-ray kind — plots,
    screenshots, documents, photos, CT slices, limb radiographs, noise, checkerboards, colour blobs —
    is rejected, while most of the last 30 real images pass. 1 − SSIM alone rejects few of them."""
    from cxr.tools.ood import OodAutoencoder

    nih = np.stack([load_grey(p) for p in sorted(nih_sample_dir.glob("*.png"))])
    order = np.random.default_rng(1).permutation(len(nih))
    train, val, held = nih[order[:70]], nih[order[70:100]], nih[order[100:]]
    torch.manual_seed(0)
    ae = OodAutoencoder(width=8, code=8)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    for step in range(30):
        batch = normalise(train[np.random.default_rng(step).choice(len(train), 16, replace=False)])
        opt.zero_grad()
        ae(batch).mean().backward()
        opt.step()
    ae.eval()
    with torch.inference_mode():
        fit = GateScore(ae, fit_feature_model(GateScore(ae, None).features(normalise(train)).double().numpy())).eval()

        def score(px):
            return fit(normalise(px)).squeeze(1).double().numpy()

        def ae_only(px):
            return ae(normalise(px)).squeeze(1).double().numpy()

        thr, thr_ae = score(val).max(), ae_only(val).max()
        held_rejected = float(np.mean(score(held) > thr))
        rates, rates_ae = {}, {}
        for kind, make in TEST_KINDS.items():
            px = to_pixels(make(8, 77))
            rates[kind], rates_ae[kind] = float(np.mean(score(px) > thr)), float(np.mean(ae_only(px) > thr_ae))
    print("rejected: held-out real", held_rejected, "| gate", rates, "| 1 − SSIM alone", rates_ae)
    assert held_rejected <= 0.2, held_rejected
    for kind, rate in rates.items():
        assert rate >= 0.75, (kind, rates)
    assert np.mean(list(rates.values())) >= 0.9, rates
    assert np.mean(list(rates.values())) > np.mean(list(rates_ae.values())) + 0.3, (rates, rates_ae)


# ------------------------------------------------------------------ a gate trained in memory ---
class MemoryLoader:
    """build_loader-compatible in-memory data for cxr.train.train (the real loop, no shards)."""

    data: dict = {}

    def __init__(self, cfg, split, rank=0, world_size=1, epoch=0, skip_batches=0, train=None):
        self.split, self.epoch, self.px = split, epoch, self.data[split]
        self.batch = 16 if split == "train" else len(self.px)
        self.n = len(self.px) // self.batch

    def __len__(self):
        return self.n

    def __iter__(self):
        rng = np.random.default_rng(self.epoch)
        order = rng.permutation(len(self.px)) if self.split == "train" else np.arange(len(self.px))
        for b in range(self.n):
            sel = order[b * self.batch : (b + 1) * self.batch]
            x = normalise(self.px[sel])
            if self.split == "train" and rng.random() < 0.5:
                x = torch.flip(x, [3])
            yield {
                "image": x,
                "labels": torch.zeros(len(sel), 14),
                "meta": torch.zeros(len(sel), 5),
                "key": [f"{self.split}{i:04d}" for i in sel],
            }

    def report(self):
        return {"samples": 0, "skipped": 0, "skipped_keys": []}


@pytest.fixture(scope="module")
def gate(tmp_path_factory, nih_sample_dir):
    """An ood_ae trained by cxr.train.train on 70 % of 200 phantoms + 70 % of the 130 NIH sample
    images (64 px); val = 15 % of each, held out = the other 15 %."""
    from cxr.tools.ood import load_gate
    from cxr.train import train

    root = tmp_path_factory.mktemp("ood")
    phantom_shards(root, 200, RES, 5, upto="synth")
    phantoms = np.stack([load_grey(p) for p in sorted((root / "synth" / "images").glob("*.png"))])
    nih = np.stack([load_grey(p) for p in sorted(nih_sample_dir.glob("*.png"))])
    rng = np.random.default_rng(0)
    parts = {}
    for name, px in (("phantom", phantoms), ("nih", nih)):
        order = rng.permutation(len(px))
        a, b = int(0.7 * len(px)), int(0.85 * len(px))
        parts[name] = (px[order[:a]], px[order[a:b]], px[order[b:]])
    MemoryLoader.data = {
        "train": np.concatenate([parts["phantom"][0], parts["nih"][0]]),
        "val": np.concatenate([parts["phantom"][1], parts["nih"][1]]),
    }
    run = root / "run"
    cfg = load_config(
        ROOT / "cxr" / "configs" / "ood_ae.yaml",
        [
            "model.width=8",
            "model.code=4",
            "train.epochs=14",
            f"checkpoint.run_dir={run}",
            "logging.progress=false",
            f"data.shards={root}",
        ],
    )
    assert train(cfg, loader_fn=MemoryLoader) == 0
    ae, _ = load_gate(run)
    with torch.inference_mode():
        features = fit_feature_model(
            GateScore(ae, None).features(normalise(MemoryLoader.data["train"])).double().numpy()
        )
        model = GateScore(ae, features).eval()
        val = model(normalise(MemoryLoader.data["val"])).squeeze(1).double().numpy()
    return {
        "model": model,
        "run": run,
        "val": val,
        "features": features,
        "held_out": {k: v[2] for k, v in parts.items()},
    }


def _scores(model, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(normalise(pixels)).squeeze(1).double().numpy()


@pytest.mark.slow
def test_threshold_percentile_is_honoured_on_val(gate):
    doc = write_threshold(gate["run"], gate["val"], PERCENTILE, features=gate["features"])
    assert read_threshold(gate["run"]) == doc
    v = np.sort(gate["val"])
    # hand computation of the linear-interpolation percentile: rank p/100·(n−1) between order statistics
    rank = PERCENTILE / 100 * (len(v) - 1)
    lo = math.floor(rank)
    expected = v[lo] + (rank - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
    assert doc["threshold"] == pytest.approx(expected, rel=1e-12)
    rejected = int((gate["val"] > doc["threshold"]).sum())
    assert rejected == len(v) - 1 - lo  # everything strictly above the interpolated order statistic
    assert abs(rejected / len(v) - (1 - PERCENTILE / 100)) <= 1 / len(v)


@pytest.mark.slow
def test_gate_rejects_outliers_far_more_often_than_held_out_x_rays(gate):
    thr = float(np.percentile(gate["val"], PERCENTILE))
    nih, phantoms = gate["held_out"]["nih"], gate["held_out"]["phantom"]
    inliers = {"held-out phantoms": phantoms, "held-out NIH sample": nih}
    outliers = {
        "textures": textures(60, 1),
        "PIL digits": digits(60, 2),
        "inverted X-rays": 255 - nih,
        "X-rays rotated 90°": np.rot90(nih, 1, (1, 2)).copy(),
        "inverted phantoms": 255 - phantoms,
        "rotated phantoms": np.rot90(phantoms, 1, (1, 2)).copy(),
    }
    rate = {k: float(np.mean(_scores(gate["model"], v) > thr)) for k, v in {**inliers, **outliers}.items()}
    print("rejection rates at p%g of val:" % PERCENTILE, json.dumps(rate, ensure_ascii=False))
    worst_inlier = max(rate[k] for k in inliers)
    assert worst_inlier <= 0.2, rate
    for name in outliers:
        assert rate[name] >= 0.6 and rate[name] >= 3 * max(worst_inlier, 0.05), (name, rate)


# ------------------------------------------------------------------ evaluate --ood on shards ---
@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ood-shards")
    phantom_shards(root, 120, RES, 3, fractions="0.5,0.25,0.25", split_seed=1)
    return root / "shards"


def _split_pixels(shards: Path, split: str) -> dict[str, np.ndarray]:
    """{key: uint8 [RES, RES]} straight from the tar files with PIL (not through cxr.data)."""
    out = {}
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        out[member.name.rsplit(".", 1)[0]] = np.asarray(im.convert("L"))
    return out


def test_evaluate_ood_reports_rejections_and_accepted_metrics(shards_dir, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from cxr.evaluate import main as evaluate_main
    from cxr.tools.ood import load_scorer
    from cxr.tools.ood import main as ood_main
    from cxr.train import train

    run = tmp_path / "gate"
    cfg = load_config(
        ROOT / "cxr" / "configs" / "ood_ae.yaml",
        [
            "train.epochs=1",
            "train.max_steps=3",
            f"checkpoint.run_dir={run}",
            "logging.progress=false",
            f"data.shards={shards_dir}",
            "data.num_threads=0",
        ],
    )
    assert train(cfg) == 0
    assert ood_main(["threshold", "--run", str(run), "--shards", str(shards_dir), "--percentile", "60"]) == 0
    thr = read_threshold(run)
    assert thr["percentile"] == 60.0
    assert thr["n_images"] == len(_split_pixels(shards_dir, "train")) + len(_split_pixels(shards_dir, "val"))
    assert thr["features"]["n_images"] == thr["n_images"] and thr["split"] == "train+val"
    member = make_member(tmp_path / "member", shards_dir, seed=1)
    out = tmp_path / "report"
    assert (
        evaluate_main(
            [
                "--runs",
                str(member),
                "--shards",
                str(shards_dir),
                "--split",
                "test",
                "--out",
                str(out),
                "--bootstrap",
                "0",
                "--no-figures",
                "--ood",
                str(run),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    # independent scoring: PIL-decoded tar members, normalised by hand, through the gate
    pixels = _split_pixels(shards_dir, "test")
    model = load_scorer(run)
    keys = sorted(pixels)
    with torch.inference_mode():
        x = (torch.from_numpy(np.stack([pixels[k] for k in keys])).float() / 255 - MEAN) / STD
        score = dict(zip(keys, model(x.unsqueeze(1)).squeeze(1).double().numpy()))
    rejected = {k for k in keys if score[k] > thr["threshold"]}
    assert f"rejected {len(rejected)} of {len(keys)} 'test' images" in printed
    assert set(pd.read_csv(out / "ood_rejected.csv")["key"].astype(str)) == rejected
    preds = pd.read_parquet(out / "predictions.parquet")
    preds = preds[(preds["split"] == "test") & (preds["member"] == "member")].set_index("key")
    table = pd.read_csv(out / "ood.csv").set_index(["member", "images"])
    accepted = [k for k in keys if k not in rejected]
    from cxrbase.labels import LABELS

    truth = preds.loc[accepted]
    aucs = [roc_auc_score(truth[f"true_{c}"], truth[c]) for c in LABELS if 0 < truth[f"true_{c}"].sum() < len(truth)]
    assert table.loc[("member", "accepted"), "n"] == len(accepted)
    assert table.loc[("member", "accepted"), "mean_auroc"] == pytest.approx(np.mean(aucs), abs=1e-9)


def test_gate_training_resumes_exactly_through_train_py(shards_dir, tmp_path):
    """A crash after a mid-epoch `last` save, then the same command: the weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    from cxr.data import build_loader
    from cxr.train import train

    def config(run: Path):
        return load_config(
            ROOT / "cxr" / "configs" / "ood_ae.yaml",
            [
                "train.epochs=2",
                "checkpoint.every_steps=1",
                f"checkpoint.run_dir={run}",
                "logging.progress=false",
                f"data.shards={shards_dir}",
                "data.num_threads=0",
                "data.batch_size=8",
            ],
        )

    class Crash(RuntimeError):
        pass

    def crashing_loader(cfg, split, *args, **kwargs):
        loader = build_loader(cfg, split, *args, **kwargs)
        if split != "train" or kwargs.get("epoch", 0) != 1 or kwargs.get("skip_batches", 0):
            return loader

        class Wrapped:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i == 2:
                        raise Crash("simulated crash in epoch 2")
                    yield batch

            def report(self):
                return loader.report()

        return Wrapped()

    assert train(config(tmp_path / "a")) == 0
    with pytest.raises(Crash):
        train(config(tmp_path / "b"), loader_fn=crashing_loader)
    assert train(config(tmp_path / "b")) == 0
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    epoch_lines = [ln for ln in (tmp_path / "a" / "train.log").read_text().splitlines() if "| val_loss " in ln]
    assert len(epoch_lines) == 2 and not any("val_auroc" in ln for ln in epoch_lines)  # no labels: no AUROC
    a = load_file(str(tmp_path / "a" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
