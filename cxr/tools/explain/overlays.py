"""Overlays: a heat map blended on the master image with a caption band and the ground-truth
boxes, and index.html showing them together."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.tools.explain.boxes import _label_rank
from cxr.tools.explain.maps import METHOD_NAMES
from cxrbase.atomic import atomic_write_text


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
