"""Out-of-distribution gate (Chester): a small conv autoencoder's 1 − SSIM(image, reconstruction) and
simple intensity/shape statistics, scored together as one Mahalanobis distance from the train images.

Train the autoencoder with the ordinary training loop — the model and the objective are picked by
config — then fit the gate and its threshold:

    python -m cxr.train --config cxr/configs/ood_ae.yaml data.shards=SHARDS checkpoint.run_dir=RUN
    python -m cxr.tools.ood threshold --run RUN --shards SHARDS --percentile 95
    python -m cxr.evaluate --runs M1 M2 --shards SHARDS --split test --out REPORT --ood RUN

``ood_ae`` (cxr/models/ood_ae.py, registered in ``cxr.models``) returns the per-image 1 − SSIM [B, 1] from ``forward``
and ``ssim_recon`` (cxr.models.losses) is the mean of that score, so train.py's loop, checkpoints
and resume are used unchanged. ``threshold`` measures :data:`FEATURES` (log(1 − SSIM), 15
statistics of the 64 px grey image — its histogram as log-odds — and its 4×4 layout) on the train and val images, fits their mean
and a shrunk covariance (Ledoit–Wolf), and takes the stated percentile of the same images'
cross-fitted Mahalanobis distances (each from a model fitted without it) as the threshold; both go to ``RUN/ood_threshold.json`` (:func:`write_threshold` owns that file). An image
whose distance exceeds the threshold is rejected. 1 − SSIM alone is not enough: a flat plot or a
page of text is easy to reconstruct (bench/ood_gate.py measures both). SSIM is pytorch-msssim's
(Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, data range 1), tested against scikit-image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.models.ood_ae import OodAutoencoder, ssim_score  # noqa: F401 — the gate's model (cxr.models owns it)
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry

THRESHOLD_FILE = "ood_threshold.json"


# ----------------------------------------------------------------------------- the gate's score
# 1 − SSIM alone passes flat or simple non-X-rays (a plot, a page of text, a colour blob: easy to
# reconstruct). The gate therefore scores a small vector of image statistics, measured at the AE's
# resolution on the [0, 1] grey image, together with log(1 − SSIM): its Mahalanobis distance from
# the train images' vectors (Ledoit–Wolf shrunk covariance, fitted by `cxr.tools.ood threshold`).
# Every statistic is a plain tensor expression, so the same code runs in PyTorch (cxr.evaluate
# --ood) and in the exported ood.onnx (the page). Intensity cut points sit between 8-bit levels,
# (k + 0.5)/255, so a pixel that arrives as k/255 (the loader's and the page's uint8 input) falls
# on the same side of a cut in float32 PyTorch and onnxruntime.
_CUTS = (12, 63, 127, 191, 242)
_GRID = 4
FEATURES = (
    "log_ae",
    "mean",
    "std",
    *(f"logodds_below_{k}" for k in _CUTS),
    "gradient",
    "fine_detail",
    "lr_asymmetry",
    "centre_minus_sides",
    "bottom_minus_top",
    "border_minus_mean",
    *(f"layout_{r}{c}" for r in range(_GRID) for c in range(_GRID)),
)

# The smallest spread a feature is scaled by (its standard deviation over the fit images is floored
# here). One pixel below a cut more or less moves a log-odds fraction at the end of its range by
# ~log 2, so a cut that no fit image crosses (no train X-ray with a pixel above 242/255, say) must
# not make an image with one such pixel thousands of standard deviations out.
SCALE_FLOOR = tuple(float(np.log(2)) if name.startswith("logodds_") else 1e-3 for name in FEATURES)


def image_features(x01: torch.Tensor, ae_score: torch.Tensor) -> torch.Tensor:
    """[B, len(FEATURES)] statistics of grey images x01 [B,1,H,W] in [0, 1] and their AE scores [B]
    (1 − SSIM). Chest X-rays: a broad histogram, smooth at 64 px, nearly left–right symmetric,
    the spine/mediastinum brighter than the lungs beside it, the abdomen brighter than the neck;
    ``logodds_below_k``: log((p + e)/(1 − p + e)) of the fraction p of pixels darker than (k + 0.5)/255,
    e = 1/(H·W); ``layout_rc``: the mean intensity of each cell of a 4×4 grid minus the image mean (where the
    lungs, the mediastinum and the diaphragm lie)."""
    x = x01[:, 0]
    h, w = (int(v) for v in x.shape[-2:])  # plain ints: the exported graph has a fixed input size
    mean = x.mean((1, 2))
    std = ((x - mean[:, None, None]) ** 2).mean((1, 2)).sqrt()
    # histogram fractions as log-odds, smoothed by one pixel's share e = 1/(h·w): the fractions of
    # X-rays crowd against 0 or 1 (few black or white pixels), where a linear scale makes a
    # plainly normal image (many bright pixels) an extreme outlier and a grey field without a single
    # dark pixel (noise at 64 px) an ordinary one; measured in bench/ood_gate.py ("linear fractions")
    e = 1.0 / (h * w)
    cuts = [torch.log((p + e) / (1.0 - p + e)) for p in ((x < (k + 0.5) / 255).to(x.dtype).mean((1, 2)) for k in _CUTS)]
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))
    dy = (x[:, 1:, :] - x[:, :-1, :]).abs().mean((1, 2))
    local = nn.functional.avg_pool2d(x01, 3, stride=1)[:, 0]
    fine = (x[:, 1:-1, 1:-1] - local).abs().mean((1, 2))
    half = w // 2
    mirror = torch.arange(w - 1, w - 1 - half, -1)  # the right half read right to left (a Gather in ONNX)
    asym = (x[:, :, :half] - x.index_select(2, mirror)).abs().mean((1, 2))
    q = w // 8
    centre = x[:, :, 3 * q : 5 * q].mean((1, 2))
    sides = 0.5 * (x[:, :, q : 3 * q].mean((1, 2)) + x[:, :, 5 * q : 7 * q].mean((1, 2)))
    third = h // 3
    bottom_top = x[:, h - third :, :].mean((1, 2)) - x[:, :third, :].mean((1, 2))
    b = max(1, h // 16)
    inner = x[:, b : h - b, b : w - b]
    border = (x.sum((1, 2)) - inner.sum((1, 2))) / (h * w - inner.shape[1] * inner.shape[2])
    log_ae = torch.log(ae_score.clamp_min(1e-6))
    layout = nn.functional.avg_pool2d(x01, (h // _GRID, w // _GRID))[:, 0].flatten(1) - mean[:, None]
    stats = torch.stack([log_ae, mean, std, *cuts, dx + dy, fine, asym, centre - sides, bottom_top, border - mean], 1)
    return torch.cat([stats, layout], 1)


def fit_feature_model(feats: np.ndarray, split: str = "train", floor=SCALE_FLOOR) -> dict:
    """The feature model of the gate from the [n, F] feature vectors of in-distribution images:
    centre, scale (standard deviation, floored at :data:`SCALE_FLOOR`) and the whitening matrix W of the shrunk
    covariance of the standardised vectors (W Wᵀ = Σ⁻¹, Ledoit–Wolf): distance = ‖Wᵀ z‖."""
    from sklearn.covariance import LedoitWolf

    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[1] != len(FEATURES) or len(feats) < 3:
        raise CxrError(f"ood feature fit: {feats.shape} feature vectors — need ≥ 3 images of the {split} split")
    centre, scale = feats.mean(0), np.maximum(feats.std(0), floor)
    cov = LedoitWolf().fit((feats - centre) / scale).covariance_
    whiten = np.linalg.cholesky(np.linalg.inv(cov))  # lower L, L Lᵀ = Σ⁻¹ → zᵀΣ⁻¹z = ‖Lᵀz‖²
    return {
        "names": list(FEATURES),
        "cuts": list(_CUTS),
        "split": split,
        "n_images": len(feats),
        "centre": centre.tolist(),
        "scale": scale.tolist(),
        "whiten": whiten.tolist(),
    }


def feature_distance(feats, model: dict) -> np.ndarray:
    """[n] Mahalanobis distances of [n, F] feature vectors under a :func:`fit_feature_model` model
    (NumPy, float64: the reference the torch gate and ood.onnx are tested against)."""
    z = (np.asarray(feats, np.float64) - np.asarray(model["centre"])) / np.asarray(model["scale"])
    return np.sqrt(((z @ np.asarray(model["whiten"])) ** 2).sum(1))


def cross_fitted_distances(feats: np.ndarray, folds: int = 20, seed: int = 0) -> np.ndarray:
    """[n] distance of every image from a feature model fitted WITHOUT it (K-fold cross-fitting,
    K = min(n, folds); leave-one-out for n ≤ folds): how far unseen in-distribution images lie.

    In-sample distances are too small (each image pulled the fit towards itself); with ~100 images
    and 32 features the difference decides the threshold, so the threshold is a percentile of these."""
    from sklearn.model_selection import KFold

    feats = np.asarray(feats, np.float64)
    out = np.empty(len(feats))
    for fit_idx, out_idx in KFold(min(len(feats), folds), shuffle=True, random_state=seed).split(feats):
        out[out_idx] = feature_distance(feats[out_idx], fit_feature_model(feats[fit_idx]))
    return out


class GateScore(nn.Module):
    """The gate: image [B,1,H,W] normalised as the loader does → score [B,1], the Mahalanobis
    distance of :func:`image_features` from the train images (feature model of ood_threshold.json).

    ``explicit_ssim``: SSIM written out as fixed separable convolutions (Gaussian 11, σ 1.5, valid
    region, population statistics, K1 0.01, K2 0.03), for ONNX export — pytorch-msssim builds its
    window inside the call, which the exporter cannot trace; the export test compares the two."""

    def __init__(
        self,
        ae: OodAutoencoder,
        feature_model: dict | None,
        explicit_ssim: bool = False,
        size: int = 11,
        sigma: float = 1.5,
    ):
        super().__init__()
        if feature_model is None:  # not fitted yet: only :meth:`features` is meaningful
            n = len(FEATURES)
            feature_model = {
                "names": list(FEATURES),
                "centre": [0.0] * n,
                "scale": [1.0] * n,
                "whiten": np.eye(n).tolist(),
            }
        if list(feature_model.get("names", [])) != list(FEATURES):
            raise CxrError(
                f"ood feature model: features {feature_model.get('names')} differ from this version's "
                f"{list(FEATURES)} — re-run `python -m cxr.tools.ood threshold`"
            )
        self.ae, self.explicit_ssim = ae, explicit_ssim
        for name in ("centre", "scale", "whiten"):
            self.register_buffer(name, torch.tensor(feature_model[name], dtype=torch.float32), persistent=False)
        coords = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        g = g / g.sum()
        self.register_buffer("win_h", g.reshape(1, 1, size, 1), persistent=False)
        self.register_buffer("win_w", g.reshape(1, 1, 1, size), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.conv2d(x, self.win_h), self.win_w)

    def _ssim_explicit(self, x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
        c1, c2 = 0.01**2, 0.03**2
        mu_x, mu_y = self._blur(x01), self._blur(y01)
        var_x = self._blur(x01 * x01) - mu_x * mu_x
        var_y = self._blur(y01 * y01) - mu_y * mu_y
        cov = self._blur(x01 * y01) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * ((2 * cov + c2) / (var_x + var_y + c2))
        return 1.0 - ssim_map.flatten(1).mean(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F] feature vectors of normalised images."""
        x01 = self.ae.to_unit(x)
        y01 = self.ae.decoder(self.ae.encoder(x01))
        ae = self._ssim_explicit(x01, y01) if self.explicit_ssim else ssim_score(x01, y01)
        return image_features(x01, ae)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.features(x) - self.centre) / self.scale
        return (z @ self.whiten).pow(2).sum(1, keepdim=True).sqrt()


# ----------------------------------------------------------------------------- threshold + scoring
def load_gate(run: str | Path, device="cpu"):
    """(model in eval mode, member record) of a trained ood_ae run."""
    from cxr.runs.open import open_member

    def check(member) -> None:
        if member.config.model.name != "ood_ae":
            raise CxrError(
                f"{run}/config.yaml: model.name is {member.config.model.name!r}, "
                f"not ood_ae — pass the OOD autoencoder's run dir"
            )

    member = open_member(run, Path(run).name, device, check)
    model = member.model
    data = member.config.data  # the run's mean/std (a run saved before they existed: the defaults it used)
    model.norm.copy_(torch.tensor([data.mean, data.std]))
    return model, member


def load_scorer(run: str | Path, device="cpu") -> GateScore:
    """The fitted gate of a run (its AE + the feature model of RUN/ood_threshold.json), eval mode."""
    ae, _ = load_gate(run, device)
    return GateScore(ae, read_threshold(run)["features"]).eval()


@torch.inference_mode()
def split_features(ae: OodAutoencoder, member, shards: str | Path, split: str, batch_size: int = 64):
    """(keys [n] object array, feature vectors [n, F] float64) of every image of ``split``, at the AE's
    resolution, read by the loader as the AE was trained."""
    from cxr.data import build_loader, to_device
    from cxr.runs.open import EvalOptions
    from cxrbase.progress import progress

    opts = EvalOptions(shards=str(shards), batch_size=batch_size, loader_device="cpu")
    loader = build_loader(member.loader_config(opts, member.config.data.resolution), split, epoch=0, train=False)
    scorer = GateScore(ae, None)
    keys, feats = [], []
    for batch in progress(loader, desc=f"ood {split}", unit="batch", dynamic_ncols=True, leave=False):
        feats.append(scorer.features(to_device(batch, "cpu")).double().numpy())
        keys.extend(str(k) for k in batch["key"])
    return np.asarray(keys, dtype=object), (np.concatenate(feats) if feats else np.zeros((0, len(FEATURES))))


def score_split(run: str | Path, shards: str | Path, split: str, batch_size: int = 64):
    """(keys [n] object array, gate scores [n] float64) of every image of ``split`` under the fitted gate."""
    ae, member = load_gate(run)
    keys, feats = split_features(ae, member, shards, split, batch_size)
    return keys, feature_distance(feats, read_threshold(run)["features"])


def write_threshold(
    run: str | Path, val_scores: np.ndarray, percentile: float, split: str = "val", features: dict | None = None
) -> dict:
    """RUN/ood_threshold.json: the gate's feature model (:func:`fit_feature_model`) and the
    ``percentile`` of ``val_scores`` — the cross-fitted distances of the ``split`` images
    (:func:`cross_fitted_distances`) — as its threshold (numpy's linear interpolation)."""
    if not 0 < percentile <= 100:
        raise CxrError(f"--percentile {percentile}: must lie in (0, 100] — e.g. 99")
    if len(val_scores) == 0:
        raise CxrError(f"{run}: no {split} images scored — the shards need a {split} split")
    thr = float(np.percentile(val_scores, percentile))
    doc = {
        "threshold": thr,
        "percentile": float(percentile),
        "split": split,
        "n_images": len(val_scores),
        "rule": "reject when score > threshold; score = Mahalanobis distance of the image's features "
        "(log(1 - SSIM(image, reconstruction)), intensity/shape statistics and a 4x4 layout) from "
        f"the {(features or {}).get('split', 'train')} images'; threshold = the percentile of the "
        "same images' cross-fitted distances (each from a model fitted without it)",
        "val_rejected_fraction": float(np.mean(val_scores > thr)),
        "features": features,
    }
    atomic_write_text(Path(run) / THRESHOLD_FILE, json.dumps(doc, indent=2) + "\n")
    return doc


def read_threshold(run: str | Path) -> dict:
    path = Path(run) / THRESHOLD_FILE
    fix = f"run `python -m cxr.tools.ood threshold --run {run} --shards SHARDS`"
    if not path.is_file():
        raise CxrError(f"{path}: missing — {fix}")
    doc = json.loads(path.read_text())
    if not isinstance(doc.get("features"), dict) or list(doc["features"].get("names", [])) != list(FEATURES):
        raise CxrError(
            f"{path}: no feature model of this version's gate (1 − SSIM alone passed plots and "
            f"text pages) — {fix} again"
        )
    return doc


def ood_report(run: str | Path, shards: str | Path, split: str, scores) -> dict:
    """Reject ``split`` images with the gate; mean AUROC of every member on accepted vs all images.

    scores: the evaluator's ScoreSet of ``split``. Returns {"n", "rejected", "threshold", "table"}."""
    import pandas as pd

    from cxr.evaluation.metrics import per_label_auroc

    keys, ood = score_split(run, shards, split)
    thr = read_threshold(run)["threshold"]
    by_key = dict(zip(keys, ood))
    missing = [k for k in scores.keys if k not in by_key]
    if missing:
        raise CxrError(f"{run}: the gate scored no image {missing[0]} of split {split!r} — use the same shards")
    accept = np.array([by_key[k] <= thr for k in scores.keys])
    rows = []
    for member, probs in scores.scores.items():
        for subset, mask in (("all", np.ones_like(accept)), ("accepted", accept)):
            aucs = per_label_auroc(scores.y_true[mask], probs[mask])
            rows.append(
                {"member": member, "images": subset, "n": int(mask.sum()), "mean_auroc": float(np.nanmean(aucs))}
            )
    return {
        "n": len(accept),
        "rejected": int((~accept).sum()),
        "threshold": thr,
        "table": pd.DataFrame(rows),
        "accepted": accept,
        "scores": np.array([by_key[k] for k in scores.keys]),
    }


def report_ood(run: str | Path, shards: str | Path, split: str, scores, out: Path) -> str:
    """Write OUT/ood.csv (mean AUROC per member on all vs accepted images) and OUT/ood_rejected.csv
    (the rejected keys with their scores); return the lines the evaluator prints."""
    import pandas as pd

    from cxrbase.atomic import atomic_write

    rep = ood_report(run, shards, split, scores)
    with atomic_write(out / "ood.csv", "w") as fh:
        rep["table"].to_csv(fh, index=False)
    rejected = pd.DataFrame({"key": scores.keys[~rep["accepted"]], "score": rep["scores"][~rep["accepted"]]})
    with atomic_write(out / "ood_rejected.csv", "w") as fh:
        rejected.to_csv(fh, index=False)
    table = rep["table"].pivot(index="member", columns="images", values="mean_auroc")
    lines = [
        f"ood gate {run}: rejected {rep['rejected']} of {rep['n']} '{split}' images "
        f"({rep['rejected'] / max(rep['n'], 1):.1%}; score > {rep['threshold']:.4f}) → {out / 'ood.csv'}",
        "mean AUROC  all  accepted",
    ]
    lines += [f"  {m}: {row['all']:.4f}  {row['accepted']:.4f}" for m, row in table.iterrows()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.tools.ood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "threshold",
        help="fit the gate's feature model on the train and val images and store it "
        "with the percentile threshold of their cross-fitted distances in RUN/ood_threshold.json",
    )
    t.add_argument("--run", required=True, help="run dir of an ood_ae training run")
    t.add_argument("--shards", required=True, help="shards folder (the one it was trained on)")
    t.add_argument(
        "--splits",
        nargs="+",
        default=["train", "val"],
        metavar="SPLIT",
        help="in-distribution splits the feature model and the threshold are fitted on (default: train "
        "val; never the split you evaluate on)",
    )
    t.add_argument(
        "--percentile",
        type=float,
        default=95.0,
        help="percentile of the cross-fitted distances used as threshold (default: 95 → ~5%% of unseen "
        "X-rays rejected)",
    )
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    ae, member = load_gate(args.run)
    feats = np.concatenate([split_features(ae, member, args.shards, split)[1] for split in args.splits])
    names = "+".join(args.splits)
    model = fit_feature_model(feats, names)
    doc = write_threshold(args.run, cross_fitted_distances(feats), args.percentile, names, model)
    print(
        f"ood gate: feature model fitted on {model['n_images']} {names} images; threshold {doc['threshold']:.4f} "
        f"= p{doc['percentile']:g} of their cross-fitted distances ({doc['val_rejected_fraction']:.1%} of them "
        f"rejected) → {Path(args.run) / THRESHOLD_FILE} in {time.time() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
