"""`python -m cxr.tools.explain` — CAM, Grad-CAM and saliency overlays, and localisation against boxes.

    python -m cxr.tools.explain --run RUN --shards DIR --split test --keys K1,K2 \\
        --labels Cardiomegaly,Effusion --method gradcam --out DIR          # overlays + index.html
    python -m cxr.tools.explain --run RUN --shards DIR --bbox BBox_List_2017.csv.gz --out DIR   # localisation
    python -m cxr.tools.explain --runs R224 R512 R1024 --shards DIR --bbox FILE --out DIR      # across runs
    accelerate launch [--multi_gpu --num_processes N] -m cxr.tools.explain ...   # each rank a disjoint share

Methods (every map is [B, L, h, w], clipped at 0, for labels L of the batch):

- ``cam`` — M_c = Σ_k w_{c,k} f_k on ``model.features`` with ``model.classifier_weight``
  (pooled-linear heads only: densenet121, resnet50, cnn, vit; refused for CBAM and BEiT).
- ``gradcam`` — ReLU(Σ_k α_k f_k), α_k = mean over space of ∂y_c/∂f_k, on the output
  f of one layer: ``--layer NAME``, or by default the deepest of the model's candidate
  layers (``model.cam_layer_candidates``: the cnn's blocks before and after their pools,
  DenseNet's dense blocks and transitions, ResNet's layer1–4, then ``model.cam_layer``)
  whose map has ≥ ``--min-map`` (16) cells a side — the final map when it is that fine
  (the cnn at 1024 px: 32×32), an earlier one at low resolution (the cnn at 128 px:
  the 16×16 ReLU of its 4th block, as its final 4×4 map puts every peak on one of 16
  cell centres). The layer and its map size are printed and kept in runs.json and
  localisation.md. Transformers (vit, beit): Grad-CAM on the last
  block's patch tokens on their grid (the ``TokenGrid`` cam layer: after ViT's final
  norm, before BEiT's fc_norm). Attention rollout is not offered: it is class-agnostic
  (one map for all 14 labels) and timm's fused attention does not expose the weights.
- ``saliency`` — max(0, Σ_{i∈S} ∂y_i/∂I): the gradient of the summed logits of a label
  set S with respect to the model's (normalised) input image I; per-label maps use
  S = {c}. y is always the logit (pre-sigmoid), as in Grad-CAM.

Library: Grad-CAM and saliency are captum's ``LayerGradCam`` and ``Saliency``
(captum 0.9, pure Python on torch; it owns the hooks and the extra forward
arguments, so metadata models work unchanged). pytorch-grad-cam (``grad-cam``) was
not used: it min–max normalises and resizes every map through OpenCV (a new heavy
dependency), which hides the raw values that the CAM = Grad-CAM identity and the
energy-fraction score need. CAM is one einsum here (captum has no CAM).

Overlays are drawn on the shard's master image (the full-resolution original, not
the model's input): the map is upsampled bilinearly to the master's size, coloured
(jet) and blended where it is high; a caption band says key, label, method,
predicted probability and ground truth; ground-truth boxes are drawn when --bbox is
given. ``index.html`` shows them together (one row per image).

Localisation (--bbox): every (image, label) of the split that has a box of that
label in the file (all boxes of that label on the image form one region). Boxes are
in the source image's pixels (the NIH file: 1024² originals; `shards synth`'s
boxes.csv: the phantom's resolution) and are scaled to the model's input size R,
where the map (upsampled to R×R) is scored:

- hit — the map's maximum lies inside the region (pointing game; an all-zero map is a miss);
- empty — the map is zero everywhere (no positive evidence for the label at that layer):
  scored as a miss, and counted in its own column (count and rate) so that "no evidence"
  is not read as "looked elsewhere";
- IoU — of {map ≥ t · max} (t = --threshold, default 0.5) with the region;
- energy — the fraction of the map's sum inside the region;
- chance — region area / image area (a uniformly random peak's hit rate).

Means per label and over all pairs, with percentile-bootstrap CIs over images
(``cxr.evaluation.metrics.bootstrap_counts``), go to ``localisation.csv`` and ``localisation.md``;
the per-pair scores to ``localisation_pairs.csv``; ``runs.json`` lists each run's model
and resolution with the counts. The report says how many of the split's images were scored. Data, models and ranks are handled with cxr.evaluation.inference's
pieces (run dirs, weights-only checkpoints, the loader config, accelerate's
``gather_object``); each rank explains a disjoint, contiguous share of the chosen
images with the evaluator's own loader.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import html
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from cxrbase.labels import LABELS

if TYPE_CHECKING:
    from cxr.runs.open import EvalOptions
from shards import remote
from shards.manifest import load_manifest

METHODS = ("cam", "gradcam", "saliency")
SALIENCY_MICRO_BATCH = 4
"""Images per saliency backward: each keeps the whole model's activations at full resolution and
in fp32 (~2.6 GB per 1024² image for DenseNet-121), whatever the evaluation batch size."""
METHOD_NAMES = {"cam": "CAM", "gradcam": "Grad-CAM", "saliency": "saliency"}
BOX_SPELLINGS = {"Infiltrate": "Infiltration"}  # BBox_List_2017 spells Infiltration this way
NIH_BOX_FRAME = 1024
SCORES = ("hit", "iou", "energy")


# ---------------------------------------------------------------- heat maps ---


def _extra(meta: Any) -> tuple | None:
    return (meta,) if meta is not None else None


def cam_maps(model: Any, image: Any, labels: Sequence[int], meta: Any = None) -> Any:
    """CAM M_c = Σ_k w_{c,k} f_k: [B,len(labels),h,w] (unclipped) on the final feature map."""
    import torch

    weight = model.classifier_weight
    if weight is None:
        raise CxrError(
            f"model {model.name}: the head is not pooled-linear, so CAM is undefined — "
            "use --method gradcam (works for every model of the suite)"
        )
    with torch.no_grad():
        return torch.einsum("bkhw,lk->blhw", model.features(image), weight[list(labels)])


def gradcam_maps(
    model: Any, image: Any, labels: Sequence[int], meta: Any = None, relu: bool = True, layer: str | None = None
) -> Any:
    """Grad-CAM on the named layer (default ``model.cam_layer``): [B,len(labels),h,w];
    relu=False keeps the signed sum Σ α_k f_k."""
    import torch
    from captum.attr import LayerGradCam

    method = LayerGradCam(model, model.get_submodule(layer) if layer else model.cam_layer)
    with torch.enable_grad():
        maps = [
            method.attribute(image, target=int(c), additional_forward_args=_extra(meta), relu_attributions=relu)
            for c in labels
        ]
    return torch.cat(maps, dim=1).detach()


def saliency_map(model: Any, image: Any, labels: Sequence[int], meta: Any = None) -> Any:
    """max(0, Σ_{i∈labels} ∂y_i/∂I) for input image I [B,1,H,W] → [B,1,H,W] (y: logits)."""
    import torch
    from captum.attr import Saliency

    index = list(labels)

    def summed(x, *extra):
        return model(x, *extra)[:, index].sum(dim=1, keepdim=True)

    image = image.detach().requires_grad_(True)
    with torch.enable_grad():
        grad = Saliency(summed).attribute(image, target=0, abs=False, additional_forward_args=_extra(meta))
    return grad.detach().clamp(min=0)


def heat_maps(
    method: str, model: Any, image: Any, labels: Sequence[int], meta: Any = None, layer: str | None = None
) -> Any:
    """The method's maps [B,len(labels),h,w] at their native size (saliency: the input's), clipped at 0;
    ``layer``: Grad-CAM's layer (default: the final map)."""
    import torch

    if method == "cam":
        return cam_maps(model, image, labels, meta).clamp(min=0)
    if method == "gradcam":
        return gradcam_maps(model, image, labels, meta, layer=layer)
    if method == "saliency":  # a full backward per label: micro-batched (32 images at 1024² would need ~85 GB)
        chunks = range(0, image.shape[0], SALIENCY_MICRO_BATCH)
        return torch.cat(
            [
                torch.cat(
                    [
                        saliency_map(
                            model,
                            image[i : i + SALIENCY_MICRO_BATCH],
                            [c],
                            None if meta is None else meta[i : i + SALIENCY_MICRO_BATCH],
                        )
                        for c in labels
                    ],
                    dim=1,
                )
                for i in chunks
            ],
            dim=0,
        )
    raise CxrError(f"--method {method}: unknown — choose one of {', '.join(METHODS)}")


EMPTY_MEANING = (
    "no positive evidence for the label anywhere in the image: every Grad-CAM weight × "
    "activation sum, CAM value or input gradient is ≤ 0 before the clip at 0"
)
MIN_MAP = 16  # the default layer is the deepest whose map is at least this many cells a side


def layer_map_sizes(model: Any, resolution: int, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(h, w) of each named layer's output map for an R×R input: one no-grad forward with hooks.

    A name that is not a module of the model, or whose output is not a map [B,C,h,w], is an error."""
    import torch

    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise CxrError(
                f"--layer {name}: model {model.name} has no such module — choose one of "
                f"{', '.join(model.cam_layer_candidates)} (or another module name of the model)"
            ) from err

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))

        handles.append(module.register_forward_hook(hook))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.features(torch.zeros(1, 1, resolution, resolution, dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        if name not in sizes:
            raise CxrError(
                f"--layer {name}: its output is not a feature map [B,C,h,w] — choose one of "
                f"{', '.join(model.cam_layer_candidates)}"
            )
    return sizes


def choose_layer(
    model: Any, method: str, resolution: int, layer: str | None = None, min_map: int = MIN_MAP
) -> tuple[str | None, tuple[int, int] | None, str]:
    """The layer a method's maps come from at R×R: (name, (h, w), why), said in the output.

    Grad-CAM, by default: the deepest of ``model.cam_layer_candidates`` whose map has at least
    ``min_map`` cells a side (deeper maps are more specific to the labels, but a map of a few
    cells puts every peak on a coarse cell centre — the cnn's final map is 4×4 at 128 px, so the
    peak cannot fall in a small lesion's box); when none is that fine, the finest one. CAM is
    defined on the final map only; saliency is on the input (no layer).
    """
    if method == "saliency":
        if layer:
            raise CxrError(
                f"--layer {layer}: saliency is the gradient on the input image and has no layer — "
                "drop --layer, or use --method gradcam"
            )
        return None, None, "the gradient on the input image"
    candidates = model.cam_layer_candidates
    if method == "cam":
        if layer and layer != model.cam_layer_name:
            raise CxrError(
                f"--layer {layer}: CAM weighs the final map ({model.cam_layer_name}) by the classifier "
                "and is undefined on other layers — use --method gradcam for another layer"
            )
        size = layer_map_sizes(model, resolution, [model.cam_layer_name])[model.cam_layer_name]
        return model.cam_layer_name, size, "CAM is defined on the final map only"
    if layer:
        return layer, layer_map_sizes(model, resolution, [layer])[layer], "chosen with --layer"
    sizes = layer_map_sizes(model, resolution, candidates)
    fine = [n for n in candidates if min(sizes[n]) >= min_map]
    if fine:
        name = fine[-1]
        why = (
            f"the deepest of {len(candidates)} candidate layers with a map ≥ {min_map}×{min_map} "
            f"(final map {'×'.join(map(str, sizes[candidates[-1]]))})"
            if len(candidates) > 1
            else f"the model's only map ({model.name}: the last block's token grid)"
        )
        if name == candidates[-1] and len(candidates) > 1:
            why = f"the final map, already ≥ {min_map}×{min_map}"
        return name, sizes[name], why
    name = max(candidates, key=lambda n: (min(sizes[n]), candidates.index(n)))  # finest, then deepest
    why = (
        f"no candidate map is ≥ {min_map}×{min_map} at {resolution} px; the finest of {len(candidates)}"
        if len(candidates) > 1
        else f"the model's only map ({model.name}), coarser than {min_map}×{min_map}"
    )
    return name, sizes[name], why


def upsample(maps: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize of maps [B,L,h,w] to size (H, W), float32, with half-pixel centres
    (``align_corners=False``): cell (i, j) of an h×w map over an H×W image is centred at pixel
    position ((i + ½)·H/h, (j + ½)·W/w) — the centre of the block of pixels it pools, as for the
    stride-s blocks of a CNN — and the map is held constant beyond the outer cell centres.
    (``align_corners=True`` would pin the outer cells' centres to the image's corner pixels,
    shifting every peak towards the border by up to half a cell.)"""
    import torch.nn.functional as F

    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


# -------------------------------------------------------------------- boxes ---


def read_boxes(path: str | Path) -> pd.DataFrame:
    """A BBox_List_2017-layout CSV → columns key, label, x, y, w, h (source-image pixels).

    Accepts the NIH file as released (gzip or not, trailing empty columns, ``Infiltrate``
    for Infiltration) and ``shards synth``'s boxes.csv. Unknown labels, missing or
    non-positive sizes are errors naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: box file not found — pass BBox_List_2017.csv.gz (NIH) or a synth boxes.csv")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if [h.strip() for h in header[:2]] != ["Image Index", "Finding Label"]:
            raise CxrError(
                f"{path}: header {','.join(header)[:60]!r} is not the BBox_List_2017 layout "
                "(Image Index,Finding Label,Bbox [x,y,w,h]) — pass the NIH box file"
            )
        for line, fields in enumerate(reader, start=2):
            if not any(f.strip() for f in fields):
                continue
            rows.append(_box_row(path, line, fields))
    return pd.DataFrame(rows, columns=["key", "label", "x", "y", "w", "h"])


def _box_row(path: Path, line: int, fields: list[str]) -> tuple:
    values = [f.strip() for f in fields]
    if len(values) < 6 or any(values[6:]):
        raise CxrError(f"{path}:{line}: expected image, label, x, y, w, h (then only empty columns) — fix the row")
    label = BOX_SPELLINGS.get(values[1], values[1])
    if label not in LABELS:
        raise CxrError(f"{path}:{line}: unknown label {values[1]!r} — labels are {', '.join(LABELS)}")
    try:
        x, y, w, h = (float(v) for v in values[2:6])
    except ValueError as err:
        raise CxrError(f"{path}:{line}: box {values[2:6]} is not four numbers — fix the row") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise CxrError(f"{path}:{line}: box {values[2:6]} needs finite x, y and w, h > 0 — fix the row")
    return Path(values[0]).stem, label, x, y, w, h


def scale_boxes(boxes: pd.DataFrame, source: tuple[float, float], target: tuple[float, float]) -> pd.DataFrame:
    """Boxes in a source frame (width, height) → the target frame (e.g. 1024² → the model's R×R)."""
    sx, sy = target[0] / source[0], target[1] / source[1]
    out = boxes.copy()
    out["x"], out["w"] = boxes["x"] * sx, boxes["w"] * sx
    out["y"], out["h"] = boxes["y"] * sy, boxes["h"] * sy
    return out


def box_mask(boxes: pd.DataFrame | Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """bool [H,W]: pixels whose centre lies in any box [x, x+w) × [y, y+h); a box that holds no centre keeps the pixel under its own centre."""
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    rows = boxes[["x", "y", "w", "h"]].to_numpy() if isinstance(boxes, pd.DataFrame) else np.asarray(boxes)
    cx, cy = np.arange(width) + 0.5, np.arange(height) + 0.5
    for x, y, w, h in rows:
        inside = ((cy >= y) & (cy < y + h))[:, None] & ((cx >= x) & (cx < x + w))[None, :]
        if not inside.any():
            i = min(max(int(y + h / 2), 0), height - 1)
            j = min(max(int(x + w / 2), 0), width - 1)
            inside[i, j] = True
        mask |= inside
    return mask


def localisation(heat: np.ndarray, region: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Pointing-game hit, IoU of {heat ≥ threshold·max} with the region, energy inside, chance rate."""
    heat = np.asarray(heat, dtype=np.float64)
    peak = heat.max()
    chance = float(region.mean())
    if not np.isfinite(peak) or peak <= 0:  # no evidence anywhere: scored as a miss, and counted as empty
        return {"hit": 0.0, "iou": 0.0, "energy": 0.0, "chance": chance, "empty": 1}
    hot = heat >= threshold * peak
    i, j = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {
        "hit": float(region[i, j]),
        "iou": float((hot & region).sum() / (hot | region).sum()),
        "energy": float(heat[region].sum() / heat.sum()),
        "chance": chance,
        "empty": 0,
    }


def summarise(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Per run and label (+ ``all``): n, mean hit/IoU/energy with bootstrap CIs over images, chance rate.

    ``pairs``: one row per (run, key, label) with the SCORES and ``chance``; every run's
    images are resampled with the same draws per label set (``cxr.evaluation.metrics.bootstrap_counts``).
    """
    from cxr.evaluation.metrics import bootstrap_counts

    rows = []
    for run, part in pairs.groupby("run", sort=False):
        keys = sorted(set(part["key"]))
        position = {k: i for i, k in enumerate(keys)}
        counts = bootstrap_counts(len(keys), n_boot, seed) if n_boot else None
        groups = [(label, part[part["label"] == label]) for label in sorted(set(part["label"]), key=_label_rank)]
        for label, group in [*groups, ("all", part)]:
            weights = counts[[position[k] for k in group["key"]]] if counts is not None else None
            row = {"run": run, "label": label, "pairs": len(group), "images": group["key"].nunique()}
            if "empty" in group:
                row["empty"] = int(group["empty"].sum())
                row["empty_rate"] = row["empty"] / len(group)
            for score in (*SCORES, "chance"):
                values = group[score].to_numpy(dtype=np.float64)
                row[score] = float(values.mean())
                if weights is not None and score != "chance":
                    boot = (weights.T @ values) / np.maximum(weights.sum(axis=0), 1e-12)
                    row[f"{score}_lo"], row[f"{score}_hi"] = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ overlays ---


def overlay_levels(heat: np.ndarray) -> np.ndarray:
    """A map's overlay levels in [0, 1]: clipped at 0, then divided by its maximum; all zeros when
    the map is ≤ 0 everywhere (empty: nothing drawn). The browser page draws the same levels
    (cxr/web/resize.js ``camLevels``), so both tools show the same evidence."""
    heat = np.asarray(heat, dtype=np.float32)
    peak = float(heat.max()) if heat.size else 0.0
    if not (np.isfinite(peak) and peak > 0):
        return np.zeros_like(heat)
    return np.clip(heat / peak, 0.0, 1.0)


def overlay(master: Any, heat: np.ndarray, caption: Sequence[str], boxes: np.ndarray | None = None) -> Any:
    """RGB PIL image of the master's size: grey master, jet heat blended where high, caption band, boxes."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    grey = np.asarray(master.convert("L"), dtype=np.float32)[..., None] / 255.0
    h = overlay_levels(heat)
    colour = colormaps["jet"](h)[..., :3].astype(np.float32)
    alpha = 0.6 * h[..., None]
    rgb = Image.fromarray(np.rint(255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(rgb, "RGBA")
    width, height = rgb.size
    line = max(6, round(width / 48))
    for x, y, w, bh in [] if boxes is None else boxes:
        draw.rectangle([x, y, x + w, y + bh], outline=(0, 255, 0, 255), width=max(1, width // 256))
    try:
        font = ImageFont.load_default(size=line)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    band = int(1.35 * line * len(caption) + line * 0.4)
    draw.rectangle([0, 0, width, min(band, height)], fill=(0, 0, 0, 170))
    for k, text in enumerate(caption):
        draw.text((line * 0.4, line * 0.2 + 1.35 * line * k), text, fill=(255, 255, 255, 255), font=font)
    return rgb


def _truth_text(truth: int | None) -> str:
    return "unknown" if truth is None else "positive" if truth else "negative"


def _caption(
    key: str, label: str, method: str, prob: float, truth: int | None, run: str, empty: bool = False
) -> list[str]:
    return [
        f"{key}  {label}  ({METHOD_NAMES[method]}, {run})",
        f"p = {prob:.3f}   truth: {_truth_text(truth)}" + ("   map: all zero" if empty else ""),
    ]


def write_index(out: Path, entries: list[dict], title: str) -> None:
    """index.html: one row per image, one captioned overlay per label."""
    by_key: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (e["run"], e["key"], _label_rank(e["label"]))):
        by_key.setdefault(f"{e['run']} · {e['key']}", []).append(e)
    cells = []
    for name, row in by_key.items():
        figs = "".join(
            f'<figure><a href="{html.escape(e["file"])}"><img src="{html.escape(e["file"])}" width="320"></a>'
            f"<figcaption>{html.escape(e['label'])}: p = {e['prob']:.3f}, truth "
            f"{_truth_text(e['truth'])}</figcaption></figure>"
            for e in row
        )
        cells.append(f"<h2>{html.escape(name)}</h2><div class=row>{figs}</div>")
    page = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}.row{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0}figcaption{font-size:13px}</style>"
        f"<h1>{html.escape(title)}</h1>{''.join(cells)}\n"
    )
    atomic_write_text(out / "index.html", page)


# -------------------------------------------------------------- data access ---


@dataclass
class Masters:
    """The shard's master (full-resolution) images of one split, read by key."""

    index: Any
    reader: Any
    position: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def open(cls, shards: Path, split: str) -> Masters:
        from cxr.data.shard_index import SampleReader, SplitIndex

        manifest = load_manifest(shards)
        index = SplitIndex.load(shards, manifest, split)
        return cls(
            index, SampleReader(index), {k: i for i, k in enumerate(index.keys)}, manifest.get("image_sizes") or {}
        )

    def image(self, key: str) -> Any:
        from PIL import Image

        from cxr.data.shard_index import CorruptSample

        try:
            data = self.reader.read(self.position[key])[0]
        except CorruptSample as bad:
            raise bad.as_error() from bad
        if self.index.codec == "ljpeg":  # lossless JPEG masters (pack --codec ljpeg): PIL cannot decode them
            from shards.image_codec import decode_ljpeg

            return Image.fromarray(decode_ljpeg(data), mode="L")
        return Image.open(io.BytesIO(data)).convert("L")

    def size(self, key: str) -> tuple[int, int]:
        """(width, height) of a master: the manifest's single size, else the image header."""
        if len(self.sizes) == 1:
            w, _, h = next(iter(self.sizes)).partition("x")
            return int(w), int(h)
        from PIL import Image

        return Image.open(io.BytesIO(self.reader.read(self.position[key])[0])).size


def select_keys(available: Sequence[str], wanted: Sequence[str], shards: Path, split: str) -> list[str]:
    """The wanted keys (``.png`` suffix allowed), each checked to be in the split."""
    have = set(available)
    keys = [Path(k.strip()).stem for k in wanted if k.strip()]
    missing = [k for k in keys if k not in have]
    if missing:
        raise CxrError(
            f"{shards}/manifest.json: split {split!r} has no image {missing[:3]} — "
            "pass keys of that split (NIH ids like 00000001_000), or another --split"
        )
    return list(dict.fromkeys(keys))


def rank_share(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous, disjoint share of the (sorted) indices."""
    ordered = sorted(indices)
    n = len(ordered)
    return ordered[rank * n // world : (rank + 1) * n // world]


def subset_loader(loader_cfg: Any, split: str, keys: Sequence[str], rank: int = 0, world: int = 1) -> Any:
    """The evaluator's loader (same decode, resize, normalisation) over this rank's share of ``keys``.

    The shares of the ranks are disjoint, contiguous in packing order, and cover the keys.
    """
    from cxr.data import build_loader
    from cxr.data.plan import EpochPlan

    loader = build_loader(loader_cfg, split, rank=0, world_size=1, epoch=0, train=False)
    position = {k: i for i, k in enumerate(loader.index.keys)}
    ids = np.asarray(rank_share([position[k] for k in keys], rank, world), dtype=np.int64)
    size = loader_cfg.eval_batch
    batches = [ids[i : i + size] for i in range(0, len(ids), size)]
    loader.plan = EpochPlan(batches, len(batches))
    return loader


# ------------------------------------------------------------------ one run ---


@dataclass
class Job:
    """What to explain: method, labels per key, boxes per (key, label) in source pixels, outputs."""

    method: str
    labels: dict[str, list[str]]
    boxes: dict[tuple[str, str], pd.DataFrame]
    out: Path
    overlays: bool
    threshold: float
    box_frame: int | None
    names: tuple[str, ...] = ()  # the model's labels (every run must have them); () = each run's own


def explain_run(
    run_dir: str,
    name: str,
    opts: EvalOptions,
    split: str,
    state: Any,
    job: Job,
    masters: Masters,
    layer: str | None = None,
    min_map: int = MIN_MAP,
) -> tuple[list[dict], list[dict], dict]:
    """Explain this rank's share of ``job`` on ``split`` with one run: (score rows, overlay entries, run
    info); ``layer``/``min_map``: as :func:`choose_layer`."""
    import torch

    from cxr.evaluation.inference import check_compatible, shards_labels
    from cxr.runs.open import on_device, open_member, renormaliser, takes_meta

    member = open_member(run_dir, name, state.device)
    model = member.model
    resolution = check_compatible([member], job.names or member.labels, opts.resolution)
    shard_names = shards_labels(remote.location(opts.shards))  # any data set's: truth is read by label name
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the input and the cam layer only
    loader_cfg = member.loader_config(opts, resolution, on_gpu=state.device.type == "cuda")
    loader = subset_loader(loader_cfg, split, list(job.labels), state.process_index, state.num_processes)
    renorm = renormaliser(member, loader_cfg, state.device)
    layer, map_size, why = choose_layer(model, job.method, resolution, layer, min_map)
    if state.is_main_process:
        where = f"layer {layer} ({map_size[0]}×{map_size[1]} map at {resolution} px; {why})" if layer else why
        print(f"{name}: {METHOD_NAMES[job.method]} on {where}", flush=True)
    rows: list[dict] = []
    entries: list[dict] = []
    from cxrbase.progress import progress

    for batch in progress(
        loader,
        total=len(loader),
        desc=f"explain {name}",
        unit="batch",
        disable=not state.is_main_process,
        dynamic_ncols=True,
    ):
        image, meta = on_device(batch, state.device)
        image, meta = renorm(image), meta if takes_meta(model) else None  # heat_maps feeds the model itself
        with torch.no_grad():
            probs = torch.sigmoid(model(image, meta).double()).cpu().numpy()
        truth = batch["labels"].numpy().round()  # NaN: unknown
        keys = list(batch["key"])
        for label in sorted({lab for k in keys for lab in job.labels[k]}, key=member.labels.index):
            rows_b = [b for b, k in enumerate(keys) if label in job.labels[k]]
            c = member.labels.index(label)
            maps = heat_maps(job.method, model, image[rows_b], [c], None if meta is None else meta[rows_b], layer)
            for m, b in zip(maps, rows_b):
                info = {
                    "run": name,
                    "key": keys[b],
                    "label": label,
                    "prob": float(probs[b, c]),
                    "truth": _truth(truth[b], shard_names, label),
                }
                if job.boxes:
                    rows.append({**info, **_score(job, masters, m, keys[b], label, resolution)})
                if job.overlays:
                    entries.append({**info, "file": _write_overlay(job, masters, m, info, name)})
    return (
        rows,
        entries,
        {
            "run": name,
            "run_dir": str(run_dir),
            "model": member.config.model.name,
            "resolution": resolution,
            "layer": layer,
            "map": f"{map_size[0]}×{map_size[1]}" if map_size else "input",
            "layer_why": why,
        },
    )


def _truth(row: np.ndarray, names: Sequence[str], label: str) -> int | None:
    """One image's ground truth of ``label`` by name in the shards' labels: 1, 0, or None when the
    shards do not have the label or do not know it for this image (masked)."""
    if label not in names or np.isnan(row[list(names).index(label)]):
        return None
    return int(row[list(names).index(label)])


def _label_rank(label: str) -> tuple[int, str]:
    """Sort key: the NIH labels in canonical order, then any other data set's labels by name."""
    return (LABELS.index(label), "") if label in LABELS else (len(LABELS), label)


def _source_frame(job: Job, masters: Masters, key: str) -> tuple[int, int]:
    return (job.box_frame, job.box_frame) if job.box_frame else masters.size(key)


def _score(job: Job, masters: Masters, heat: Any, key: str, label: str, resolution: int) -> dict:
    """Localisation scores of one map [1,h,w] against the (key, label) region, at the model's R×R."""
    boxes = scale_boxes(job.boxes[(key, label)], _source_frame(job, masters, key), (resolution, resolution))
    region = box_mask(boxes, (resolution, resolution))
    scores = localisation(upsample(heat[None], (resolution, resolution))[0, 0].cpu().numpy(), region, job.threshold)
    return {**scores, "map_h": int(heat.shape[-2]), "map_w": int(heat.shape[-1])}


def _write_overlay(job: Job, masters: Masters, heat: Any, info: dict, run: str) -> str:
    master = masters.image(info["key"])
    width, height = master.size
    full = upsample(heat[None], (height, width))[0, 0].cpu().numpy()
    boxes = None
    if (info["key"], info["label"]) in job.boxes:
        src = _source_frame(job, masters, info["key"])
        boxes = scale_boxes(job.boxes[(info["key"], info["label"])], src, (width, height))[
            ["x", "y", "w", "h"]
        ].to_numpy()
    caption = _caption(info["key"], info["label"], job.method, info["prob"], info["truth"], run, not full.max() > 0)
    image = overlay(master, full, caption, boxes)
    name = f"{run}/{info['key']}_{info['label']}_{job.method}.png"
    (job.out / run).mkdir(parents=True, exist_ok=True)
    with atomic_write(job.out / name, "wb") as fh:
        image.save(fh, format="PNG")
    return name


# ------------------------------------------------------------------ outputs ---


def localisation_markdown(summary: pd.DataFrame, runs: list[dict], counts: dict, args: argparse.Namespace) -> str:
    """localisation.md: what was scored, then the overall table across runs and the per-label table."""

    def ci(row, score):
        lo, hi = row.get(f"{score}_lo"), row.get(f"{score}_hi")
        return f"{row[score]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else "")

    res = {r["run"]: r["resolution"] for r in runs}
    layer = {r["run"]: _layer_cell(r) for r in runs}

    def empty(row):
        return f"{int(row['empty'])} ({row['empty_rate']:.3f})"

    lines = [
        f"# Localisation ({METHOD_NAMES[args.method]}) on split `{args.split}`",
        "",
        f"Boxes: `{args.bbox}`. Scored {counts['scored_images']} of the split's {counts['split_images']} "
        f"images ({counts['scored_pairs']} image-label pairs): those with a box; "
        f"{counts['boxed_elsewhere']} boxed images of the file are not in this split.",
        f"hit: the map's peak inside the label's box(es) (pointing game); IoU: {{map ≥ {args.threshold:g}·max}} "
        "vs the boxes; energy: the map's share inside the boxes; chance: box area / image area "
        f"(the hit rate of a random peak). 95 % CIs: {args.bootstrap} bootstrap resamples over images.",
        (
            f"empty: maps that are zero everywhere ({EMPTY_MEANING}); they are scored as misses "
            "(hit, IoU and energy 0), so a high empty rate means the model gave no evidence, "
            "not that it looked elsewhere."
        ),
        "",
        "| run | resolution | layer (map) | pairs | hit | IoU | energy | chance | empty |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    overall = summary[summary["label"] == "all"]
    for _, row in overall.iterrows():
        lines.append(
            f"| {row['run']} | {res[row['run']]} | {layer[row['run']]} | {row['pairs']} | {ci(row, 'hit')} | "
            f"{ci(row, 'iou')} | {ci(row, 'energy')} | {row['chance']:.3f} | {empty(row)} |"
        )
    lines += [
        "",
        "## Per label",
        "",
        "| run | label | pairs | hit | IoU | energy | chance | empty |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary[summary["label"] != "all"].iterrows():
        lines.append(
            f"| {row['run']} | {row['label']} | {row['pairs']} | {ci(row, 'hit')} | {ci(row, 'iou')} | "
            f"{ci(row, 'energy')} | {row['chance']:.3f} | {empty(row)} |"
        )
    return "\n".join(lines) + "\n"


def _layer_cell(run: dict) -> str:
    return f"{run['layer']} ({run['map']})" if run.get("layer") else str(run.get("map", ""))


def format_runs_table(summary: pd.DataFrame, runs: list[dict]) -> str:
    """The across-runs table for the terminal: overall hit/IoU/energy per run, by resolution."""
    res = {r["run"]: r["resolution"] for r in runs}
    overall = summary[summary["label"] == "all"].copy()
    overall["resolution"] = overall["run"].map(res)
    maps = {r["run"]: r.get("map", "") for r in runs}
    head = (
        f"{'run':<20} {'res':>5} {'map':>7} {'pairs':>6} {'hit':>22} {'IoU':>22} {'energy':>22} {'chance':>7} "
        f"{'empty':>13}"
    )
    lines = [head]
    for _, r in overall.sort_values("resolution").iterrows():
        cells = [f"{r[s]:.3f} [{r.get(s + '_lo', np.nan):.3f},{r.get(s + '_hi', np.nan):.3f}]" for s in SCORES]
        empty = f"{int(r['empty'])} ({r['empty_rate']:.3f})"
        lines.append(
            f"{str(r['run'])[:20]:<20} {r['resolution']:>5} {maps[r['run']]:>7} {r['pairs']:>6} "
            f"{cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {r['chance']:>7.3f} {empty:>13}"
        )
    lines.append(f"empty: maps zero everywhere ({EMPTY_MEANING}), scored as misses")
    return "\n".join(lines)


def write_localisation(
    out: Path, pairs: pd.DataFrame, runs: list[dict], counts: dict, args: argparse.Namespace
) -> pd.DataFrame:
    summary = summarise(pairs, args.bootstrap, args.seed, args.alpha)
    summary.insert(1, "resolution", summary["run"].map({r["run"]: r["resolution"] for r in runs}))
    summary.insert(2, "method", args.method)
    with atomic_write(out / "localisation.csv", "w") as fh:
        summary.to_csv(fh, index=False)
    with atomic_write(out / "localisation_pairs.csv", "w") as fh:
        pairs.to_csv(fh, index=False)
    atomic_write_text(out / "localisation.md", localisation_markdown(summary, runs, counts, args))
    return summary


# ---------------------------------------------------------------------- CLI ---


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.tools.explain",
        description="Explain trained runs' predictions: CAM / Grad-CAM / saliency overlays on the full-"
        "resolution master images (PNG per image and label + index.html), and with --bbox the "
        "localisation scores against ground-truth boxes (pointing-game hit, IoU at a threshold, "
        "energy inside the box, chance rate) per label and overall with bootstrap CIs. Under "
        "`accelerate launch` each rank explains a disjoint share; rank 0 writes the tables.",
        epilog="Examples:\n"
        "  python -m cxr.tools.explain --run runs/d121 --shards data/shards --split test --keys 00000001_000 \\\n"
        "      --labels Cardiomegaly,Effusion --method gradcam --out explain/\n"
        "  python -m cxr.tools.explain --run runs/d121 --shards data/shards --bbox "
        "../shared/data/nih/BBox_List_2017.csv.gz --out loc/\n"
        "  python -m cxr.tools.explain --runs runs/r224 runs/r1024 --shards data/shards --bbox FILE --out loc/\n"
        "  python -m cxr.tools.explain --run runs/tiny --shards data/shards --bbox FILE --layer trunk.blocks.4 --out loc4/\n"
        "Grad-CAM's layer: the deepest candidate with a map ≥ --min-map cells a side unless --layer is given; "
        "the output names it.\n"
        "--debug shows the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run", help="one training run dir (config.yaml + checkpoints/best)")
    runs.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN",
        help="several run dirs: each is explained, and with --bbox the table across runs "
        "(localisation vs resolution) is printed",
    )
    p.add_argument("--shards", required=True, help="shards folder with manifest.json (masters)")
    p.add_argument("--split", default="test", help="split to explain (default: test)")
    p.add_argument("--keys", default=None, help="comma-separated image keys to draw overlays for")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated labels to explain for --keys (default: every label); "
        "with --bbox: restrict the scored labels",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="gradcam",
        help="cam (pooled-linear heads), gradcam (any model), saliency (default: gradcam)",
    )
    p.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help="Grad-CAM's layer, a module name of the model (e.g. trunk.blocks.3.2 for the cnn); "
        "default: the deepest of the model's candidate layers whose map is ≥ --min-map cells a side "
        "(the final map when it is that fine), said in the output",
    )
    p.add_argument(
        "--min-map",
        type=int,
        default=MIN_MAP,
        metavar="N",
        help=f"the default layer's smallest map side (default: {MIN_MAP})",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--bbox",
        default=None,
        metavar="FILE",
        help="BBox_List_2017.csv[.gz] layout (NIH, or synth's boxes.csv): score localisation "
        "on every image of the split with a box",
    )
    p.add_argument(
        "--bbox-frame",
        type=int,
        default=None,
        metavar="N",
        help="pixel frame of the box file (N×N); default: each master image's own size "
        "(the NIH masters are the 1024² originals the NIH boxes refer to)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="IoU: the map is thresholded at this fraction of its maximum (default: 0.5)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs; 0: none (default: 1000)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="with --bbox: score at most this many images (quick looks)")
    p.add_argument("--overlays", action="store_true", help="with --bbox: also write an overlay per scored pair")
    p.add_argument(
        "--resolution", type=int, default=None, help="explain at R×R (default: each run's training resolution)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch per rank (default: the run's eval batch)"
    )
    p.add_argument("--backend", choices=["dali", "wds"], default=None, help="loader back end (default: the run's)")
    p.add_argument("--num-threads", type=int, default=None, help="loader threads/workers per rank (default: the run's)")
    p.add_argument("--loader-device", choices=["cpu", "gpu"], default=None, help="where the loader decodes")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return p


def _parse_labels(text: str | None, default: Sequence[str]) -> list[str]:
    """--labels (comma-separated) checked against ``default``, the model's labels (any data set's)."""
    if text is None:
        return list(default)
    labels = [BOX_SPELLINGS.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    unknown = [t for t in labels if t not in default]
    if unknown:
        raise CxrError(f"--labels {text}: unknown {unknown} — the model's labels are {', '.join(default)}")
    return labels


def plan_job(args: argparse.Namespace, masters: Masters, names: Sequence[str] = LABELS) -> tuple[Job, dict]:
    """Which (key, label) pairs to explain, their boxes, and the counts the report states.
    ``names``: the model's labels (the first run's; the 14 NIH ones or any data set's)."""
    out = Path(args.out)
    keys = masters.index.keys
    boxes: dict[tuple[str, str], pd.DataFrame] = {}
    counts = {"split_images": len(keys)}
    if args.bbox:
        table = read_boxes(args.bbox)
        wanted = set(_parse_labels(args.labels, names))
        in_split = table[table["key"].isin(set(keys)) & table["label"].isin(wanted)]
        chosen = sorted(set(in_split["key"]))
        if args.keys:  # score (and draw) only these
            chosen = [
                k
                for k in select_keys(keys, args.keys.split(","), remote.location(args.shards), args.split)
                if k in set(chosen)
            ]
        chosen = chosen[: args.limit] if args.limit else chosen
        in_split = in_split[in_split["key"].isin(set(chosen))]
        boxes = {kl: g for kl, g in in_split.groupby(["key", "label"])}
        labels = {k: sorted({lab for kk, lab in boxes if kk == k}, key=list(names).index) for k in chosen}
        counts.update(
            scored_images=len(chosen), scored_pairs=len(boxes), boxed_elsewhere=len(set(table["key"]) - set(keys))
        )
        if not labels:
            raise CxrError(
                f"{args.bbox}: no box of {sorted(wanted)} is on an image of split {args.split!r} — "
                "NIH boxes are almost all on the official test list; use that split"
            )
    else:
        if not args.keys:
            raise CxrError("--keys: which images to explain? — pass --keys K1,K2 (or --bbox FILE to score a split)")
        chosen = select_keys(keys, args.keys.split(","), remote.location(args.shards), args.split)
        labels = {k: _parse_labels(args.labels, names) for k in chosen}
    overlays = bool(args.keys) or args.overlays
    return Job(args.method, labels, boxes, out, overlays, args.threshold, args.bbox_frame, tuple(names)), counts


def _gather(items: list, state: Any) -> list | None:
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        items = gather_object(items)
    return items if state.is_main_process else None


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 0 or not 0 < args.alpha < 1 or not 0 < args.threshold <= 1 or args.min_map < 1:
        raise CxrError(
            "--bootstrap must be ≥ 0, --alpha in (0, 1), --threshold in (0, 1], --min-map ≥ 1 — fix the flags"
        )
    start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from cxr.evaluation.inference import member_names, process_state
    from cxr.runs.open import EvalOptions, read_member

    run_dirs = [args.run] if args.run else list(args.runs)
    shards = remote.location(args.shards)
    load_manifest(shards)  # a missing or invalid manifest fails before any process group starts
    state = process_state(args.cpu)
    masters = Masters.open(shards, args.split)
    names = read_member(run_dirs[0], member_names(run_dirs[:1])[0]).labels  # the model's labels
    job, counts = plan_job(args, masters, names)
    opts = EvalOptions(
        shards=str(args.shards),
        resolution=args.resolution,
        backend=args.backend,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
        loader_device=args.loader_device,
        cpu=args.cpu,
    )
    rows, entries, runs = [], [], []
    for run_dir, name in zip(run_dirs, member_names(run_dirs)):
        r, e, info = explain_run(run_dir, name, opts, args.split, state, job, masters, args.layer, args.min_map)
        rows += r
        entries += e
        runs.append(info)
    rows, entries = _gather(rows, state), _gather(entries, state)
    masters.reader.close()
    if rows is None:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if entries:
        write_index(out, entries, f"{METHOD_NAMES[args.method]} on split {args.split}")
    atomic_write_text(
        out / "runs.json", json.dumps({"runs": runs, "counts": counts, "method": args.method}, indent=2) + "\n"
    )
    took = time.perf_counter() - start
    n_maps = len(rows) if job.boxes else len(entries)
    if job.boxes:
        pairs = pd.DataFrame(rows).drop_duplicates(["run", "key", "label"])
        counts["scored_pairs"] = int(pairs.groupby("run").size().max())
        summary = write_localisation(out, pairs, runs, counts, args)
        print(format_runs_table(summary, runs))
        print(
            f"localisation: {counts['scored_images']} of {counts['split_images']} images of '{args.split}' scored "
            f"({counts['scored_pairs']} pairs) × {len(runs)} run(s) on {state.num_processes} rank(s) in {took:.1f} s; "
            f"report: {out / 'localisation.md'}"
        )
    if entries:
        print(f"overlays: {len(entries)} PNG(s) → {out / 'index.html'}")
    print(
        f"explained {n_maps} (image, label) pair(s) with {METHOD_NAMES[args.method]} in {took:.1f} s "
        f"({n_maps / max(took, 1e-9):.2f}/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
