"""Out-of-distribution gate (Chester): a small conv autoencoder; score = 1 − SSIM(image, reconstruction).

Train it with the ordinary training loop — the model and the objective are picked by config:

    python -m cxr.train --config cxr/configs/ood_ae.yaml data.shards=SHARDS checkpoint.run_dir=RUN
    python -m cxr.ood threshold --run RUN --shards SHARDS --percentile 99
    python -m cxr.evaluate --runs M1 M2 --shards SHARDS --split test --out REPORT --ood RUN

``ood_ae`` (registered in ``cxr.models``) returns the per-image score [B, 1] from ``forward``
and ``ssim_recon`` (cxr.losses) is the mean of that score, so train.py's loop, checkpoints
and resume are used unchanged. The threshold is the stated percentile of the val scores,
written to ``RUN/ood_threshold.json`` (module :func:`write_threshold` owns that file); an
image whose score exceeds it is rejected. SSIM is pytorch-msssim's (Gaussian window 11,
σ 1.5, K1 0.01, K2 0.03, data range 1), tested against scikit-image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry

THRESHOLD_FILE = "ood_threshold.json"


def ssim_score(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """[B] 1 − SSIM of grey images in [0, 1], [B,1,H,W] each (H, W ≥ 11)."""
    from pytorch_msssim import ssim

    return 1.0 - ssim(x01, y01, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)


def _block(c_in: int, c_out: int, down: bool) -> nn.Sequential:
    conv = (nn.Conv2d(c_in, c_out, 4, stride=2, padding=1) if down
            else nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


class OodAutoencoder(nn.Module):
    """image [B,1,H,W] normalised as the loader does ((x/255 − mean)/std), H = W divisible by 16
    → score [B,1] = 1 − SSIM(x, recon) in [0, 2]; :meth:`reconstruct` gives the image in [0, 1]."""

    uses_meta = False

    def __init__(self, width: int = 16, code: int = 16, mean: float = 0.5176, std: float = 0.2542):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(_block(1, w, True), _block(w, 2 * w, True), _block(2 * w, 4 * w, True),
                                     nn.Conv2d(4 * w, code, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(_block(code, 4 * w, False), _block(4 * w, 2 * w, False),
                                     _block(2 * w, w, False), nn.ConvTranspose2d(w, 1, 4, stride=2, padding=1),
                                     nn.Sigmoid())
        self.register_buffer("norm", torch.tensor([mean, std], dtype=torch.float32), persistent=False)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the loader's normalisation: [0, 1] intensities (clamped; augmentation may overshoot)."""
        return (x * self.norm[1] + self.norm[0]).clamp(0.0, 1.0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(self.to_unit(x)))

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise CxrError(f"ood_ae: input {tuple(x.shape)} — H and W must be multiples of 16 "
                           f"(data.resolution=64 or 128)")
        x01 = self.to_unit(x)
        return ssim_score(x01, self.decoder(self.encoder(x01))).unsqueeze(1)


class ExportableGate(nn.Module):
    """The gate with SSIM written out as fixed separable convolutions, for ONNX export.

    pytorch-msssim builds its Gaussian window inside the call, which the ONNX exporter cannot
    trace as a convolution kernel; this is the same computation (Gaussian 11, σ 1.5, valid
    region, population statistics, K1 0.01, K2 0.03) with the window as a buffer. The export
    test compares onnxruntime's output with :class:`OodAutoencoder` (pytorch-msssim)."""

    def __init__(self, gate: OodAutoencoder, size: int = 11, sigma: float = 1.5):
        super().__init__()
        self.gate = gate
        coords = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
        g = g / g.sum()
        self.register_buffer("win_h", g.reshape(1, 1, size, 1), persistent=False)
        self.register_buffer("win_w", g.reshape(1, 1, 1, size), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.conv2d(x, self.win_h), self.win_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x01 = self.gate.to_unit(x)
        y01 = self.gate.decoder(self.gate.encoder(x01))
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        mu_x, mu_y = self._blur(x01), self._blur(y01)
        var_x = self._blur(x01 * x01) - mu_x * mu_x
        var_y = self._blur(y01 * y01) - mu_y * mu_y
        cov = self._blur(x01 * y01) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * ((2 * cov + c2) / (var_x + var_y + c2))
        return 1.0 - ssim_map.flatten(1).mean(1, keepdim=True)


def build(args, width: int = 16, code: int = 16) -> OodAutoencoder:
    """Registry builder (cxr.models): the classifier options (num_labels, metadata …) do not apply."""
    if args.metadata != "none" or args.conv_stem or args.pretrained:
        raise CxrError("model.name=ood_ae: metadata, conv_stem and pretrained do not apply — leave them at "
                       "their defaults")
    return OodAutoencoder(width=width, code=code)


# ----------------------------------------------------------------------------- threshold + scoring
def load_gate(run: str | Path, device="cpu"):
    """(model in eval mode, member record) of a trained ood_ae run."""
    from cxr.inference import build_member_model, read_member

    member = read_member(run, Path(run).name)
    if member.config.get("model", {}).get("name") != "ood_ae":
        raise CxrError(f"{run}/config.yaml: model.name is {member.config.get('model', {}).get('name')!r}, "
                       f"not ood_ae — pass the OOD autoencoder's run dir")
    model = build_member_model(member, torch.device(device))
    data = member.config.get("data", {})
    model.norm.copy_(torch.tensor([data.get("mean", 0.5176), data.get("std", 0.2542)]))
    return model, member


@torch.inference_mode()
def score_split(run: str | Path, shards: str | Path, split: str, batch_size: int = 64):
    """(keys [n] object array, scores [n] float64) of every image of ``split``, at the AE's resolution."""
    from cxrbase.progress import progress

    from cxr.data import DataConfig, build_loader

    model, member = load_gate(run)
    data = {k: v for k, v in member.config.get("data", {}).items()
            if k in {f for f in DataConfig.__dataclass_fields__}}
    data.update(shards=str(shards), augment=False, eval_batch_size=batch_size, device="cpu")
    loader = build_loader(DataConfig(**data), split, epoch=0, train=False)
    keys, scores = [], []
    for batch in progress(loader, desc=f"ood {split}", unit="batch", dynamic_ncols=True, leave=False):
        scores.append(model(batch["image"]).squeeze(1).double().numpy())
        keys.extend(str(k) for k in batch["key"])
    return np.asarray(keys, dtype=object), (np.concatenate(scores) if scores else np.zeros(0))


def write_threshold(run: str | Path, val_scores: np.ndarray, percentile: float, split: str = "val") -> dict:
    """RUN/ood_threshold.json: the ``percentile`` of the val scores (numpy's linear interpolation)."""
    if not 0 < percentile <= 100:
        raise CxrError(f"--percentile {percentile}: must lie in (0, 100] — e.g. 99")
    if len(val_scores) == 0:
        raise CxrError(f"{run}: no {split} images scored — the shards need a {split} split")
    doc = {"threshold": float(np.percentile(val_scores, percentile)), "percentile": float(percentile),
           "split": split, "n_images": int(len(val_scores)),
           "rule": "reject when score = 1 - SSIM(image, reconstruction) > threshold",
           "val_rejected_fraction": float(np.mean(val_scores > np.percentile(val_scores, percentile)))}
    atomic_write_text(Path(run) / THRESHOLD_FILE, json.dumps(doc, indent=2) + "\n")
    return doc


def read_threshold(run: str | Path) -> dict:
    path = Path(run) / THRESHOLD_FILE
    if not path.is_file():
        raise CxrError(f"{path}: missing — run `python -m cxr.ood threshold --run {run} --shards SHARDS`")
    return json.loads(path.read_text())


def ood_report(run: str | Path, shards: str | Path, split: str, scores) -> dict:
    """Reject ``split`` images with the gate; mean AUROC of every member on accepted vs all images.

    scores: the evaluator's ScoreSet of ``split``. Returns {"n", "rejected", "threshold", "table"}."""
    import pandas as pd

    from cxr.metrics import per_label_auroc

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
            rows.append({"member": member, "images": subset, "n": int(mask.sum()),
                         "mean_auroc": float(np.nanmean(aucs))})
    return {"n": len(accept), "rejected": int((~accept).sum()), "threshold": thr, "table": pd.DataFrame(rows),
            "accepted": accept, "scores": np.array([by_key[k] for k in scores.keys])}


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
    lines = [f"ood gate {run}: rejected {rep['rejected']} of {rep['n']} '{split}' images "
             f"({rep['rejected'] / max(rep['n'], 1):.1%}; score > {rep['threshold']:.4f}) → {out / 'ood.csv'}",
             "mean AUROC  all  accepted"]
    lines += [f"  {m}: {row['all']:.4f}  {row['accepted']:.4f}" for m, row in table.iterrows()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cxr.ood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("threshold", help="score the val split and store the percentile threshold in RUN")
    t.add_argument("--run", required=True, help="run dir of an ood_ae training run")
    t.add_argument("--shards", required=True, help="shards folder (the one it was trained on)")
    t.add_argument("--split", default="val", help="split the threshold is taken from (default: val)")
    t.add_argument("--percentile", type=float, default=99.0,
                   help="percentile of the split's scores used as threshold (default: 99 → ~1%% of val rejected)")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    _, scores = score_split(args.run, args.shards, args.split)
    doc = write_threshold(args.run, scores, args.percentile, args.split)
    print(f"ood threshold {doc['threshold']:.4f} = p{doc['percentile']:g} of {doc['n_images']} {args.split} "
          f"scores ({doc['val_rejected_fraction']:.1%} of them rejected) → {Path(args.run) / THRESHOLD_FILE} "
          f"in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
