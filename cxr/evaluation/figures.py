"""The evaluation's figures: ROC/PR curves (roc.png, pr.png) and reliability diagrams
(reliability.png), one panel per label; matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.analysis import Analysis
from cxr.evaluation.scores import ENSEMBLE, ScoreSet, focus_member
from cxr.evaluation.tables import fmt
from cxrbase.atomic import atomic_write
from cxrbase.labels import LABELS


def _operating_points(
    y: np.ndarray, s: np.ndarray, tuned: dict[str, np.ndarray], c: int
) -> dict[str, tuple[float, float, float]]:
    """(FPR, TPR, precision) on this split at 0.5 and each tuned threshold of label c."""
    points = {}
    for name, thr in {"0.5": 0.5, **{k: v[c] for k, v in tuned.items() if k in _MARKERS}}.items():
        pred = s >= thr
        tp, fp = float((pred & y).sum()), float((pred & ~y).sum())
        n_pos, n_neg = float(y.sum()), float((~y).sum())
        points[name] = (
            fp / n_neg if n_neg else math.nan,
            tp / n_pos if n_pos else math.nan,
            tp / (tp + fp) if tp + fp else math.nan,
        )
    return points


_MARKERS = {"0.5": ("s", "0.5"), "f1": ("o", "F1-tuned"), "youden": ("^", "Youden-tuned")}


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TP, FP) when predicting s >= t for each distinct score t, descending, from (0, 0)."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ys.size - 1]
    tp = np.cumsum(ys, dtype=np.float64)[last]
    return np.r_[0.0, tp], np.r_[0.0, last + 1 - tp]


def _thin(x: np.ndarray, y: np.ndarray, limit: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ~limit points of a curve (a 3-inch panel cannot show more)."""
    if x.size <= limit:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, x.size - 1, limit).astype(int), x.size - 1])
    return x[keep], y[keep]


def panel_grid(title: str, panels: int = 16):
    """A square grid of at least ``panels`` panels (4 × 4 for the 14 NIH labels + legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(4, math.ceil(math.sqrt(panels)))
    fig, axes = plt.subplots(side, side, figsize=(15 * side / 4, 15 * side / 4), dpi=100)
    fig.suptitle(title, fontsize=15)
    return plt, fig, axes.ravel()


def _member_styles(members: Sequence[str]) -> dict[str, dict[str, Any]]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    styles = {}
    singles = [x for x in members if x != ENSEMBLE]
    if len(singles) == 1 and ENSEMBLE in members:  # an ensemble of one IS its member: one curve, one entry
        return {ENSEMBLE: {"color": "black", "lw": 2.2, "alpha": 1.0, "label": f"{singles[0]} (= {ENSEMBLE} of 1)"}}
    for i, m in enumerate(singles):
        styles[m] = {"color": palette(i % 10), "lw": 1.0, "alpha": 0.75, "label": m}
    styles[ENSEMBLE] = {"color": "black", "lw": 2.2, "alpha": 1.0, "label": ENSEMBLE}
    return styles


def plot_curves(
    path: Path, scores: ScoreSet, aucs: pd.DataFrame, tuned: dict[str, dict[str, np.ndarray]], kind: str, split: str
) -> None:
    """Write roc.png (kind="roc") or pr.png (kind="pr"): 14 panels, members + ensemble,
    the ensemble's operating points (0.5, F1- and Youden-tuned thresholds) marked."""
    title = {"roc": "ROC", "pr": "Precision–recall"}[kind]
    plt, fig, axes = panel_grid(f"{title} curves — split '{split}', {scores.n} images", len(scores.labels) + 1)
    styles = _member_styles(list(scores.scores))
    metric = "auroc" if kind == "roc" else "auprc"
    lookup = aucs.set_index(["member", "label"])[metric]
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    for c, (ax, label) in enumerate(zip(axes, scores.labels)):
        rows = ~np.isnan(np.asarray(scores.y_true[:, c], dtype=np.float64))  # the images that know the label
        y = scores.y_true[rows, c].astype(bool)
        ax.set_title(f"{label}  ({metric.upper()} {lookup.get((focus, label), math.nan):.3f})", fontsize=10)
        ax.set_xlim(-0.02, 1.02), ax.set_ylim(-0.02, 1.03)  # room for markers on the edges
        ax.set_xlabel("1 − specificity" if kind == "roc" else "recall", fontsize=8)
        ax.set_ylabel("sensitivity" if kind == "roc" else "precision", fontsize=8)
        ax.tick_params(labelsize=7)
        if y.all() or not y.any():
            ax.text(0.5, 0.5, "undefined:\nonly one class", ha="center", va="center")
            continue
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        else:
            ax.axhline(y.mean(), color="0.7", lw=0.8, ls="--")
        for member in styles:
            tp, fp = _cumulative_counts(y, scores.scores[member][rows, c])
            if kind == "roc":
                ax.plot(*_thin(fp / fp[-1], tp / tp[-1]), **styles[member])
            else:
                ax.plot(*_thin(tp[1:] / tp[-1], tp[1:] / (tp[1:] + fp[1:])), drawstyle="steps-pre", **styles[member])
        points = _operating_points(y, scores.scores[focus][rows, c], tuned.get(focus, {}), c)
        for name, (fpr, tpr, ppv) in points.items():
            marker, text = _MARKERS[name]
            xy = (fpr, tpr) if kind == "roc" else (tpr, ppv)
            ax.plot(*xy, marker=marker, ms=8, mfc="none", mec="red", mew=1.6, ls="none", label=f"{focus} @ {text}")
    _legend_panel(axes, styles, tuned, focus, kind, len(scores.labels))
    # fixed margins: tight_layout would cost a second full draw
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.94, wspace=0.28, hspace=0.32)
    save_png(fig, path)
    plt.close(fig)


def plot_reliability(
    path: Path, scores: ScoreSet, calibrated: np.ndarray | None, split: str, analysis: Analysis | None = None
) -> None:
    """reliability.png: a panel per label of the focus score set's equal-width reliability
    diagram (observed frequency against mean predicted probability per bin, before and after
    post-hoc calibration), with each bin's image count as a bar on a log axis underneath."""
    from matplotlib.ticker import NullLocator

    from cxr.evaluation.calibration import N_BINS, reliability_bins

    focus = focus_member(scores)
    plt, fig, axes = panel_grid(
        f"Reliability ({N_BINS} equal-width bins) — `{focus}` on split '{split}', {scores.n} images",
        len(scores.labels) + 1,
    )
    series = {"raw": (scores.scores[focus], "0.45", "o")}
    if calibrated is not None:
        series["calibrated"] = (calibrated, "tab:blue", "s")
    for c, (ax, label) in enumerate(zip(axes, scores.labels)):
        rows = ~np.isnan(np.asarray(scores.y_true[:, c], dtype=np.float64))  # the images that know the label
        y = scores.y_true[rows, c]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        counts = ax.twinx()
        counts.set_yscale("log")
        # decades only: the log axis' unlabelled minor ticks (up to 8 a decade, 14 panels) took ~40 %
        # of this figure's drawing (1.30 → 0.79 s for the 4×4 grid here)
        counts.yaxis.set_minor_locator(NullLocator())
        counts.tick_params(labelsize=6, colors="0.5")
        width = 1.0 / N_BINS
        for i, (name, (probs, color, marker)) in enumerate(series.items()):
            b = reliability_bins(y, probs[rows, c], N_BINS, "width")
            full = b["count"] > 0
            ax.plot(b["mean_p"][full], b["freq"][full], marker=marker, ms=4, color=color, lw=1.2, label=name)
            left = b["edges"][:-1] + i * width / 2
            counts.bar(left[full], b["count"][full], width=width / 2, align="edge", color=color, alpha=0.25)
        counts.set_ylim(0.8, max(10.0, scores.n) * 30)  # bars in the lower part of the panel
        ax.set_zorder(counts.get_zorder() + 1), ax.patch.set_visible(False)
        ax.set_xlim(0, 1), ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label}  ({int(y.sum())} positives)" + _ece_title(analysis, focus, label), fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(scores.labels) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color=color, marker=marker, label=f"{focus} {name}")
        for name, (_, color, marker) in series.items()
    ]
    handles += [
        Patch(color="0.45", alpha=0.25, label="images per bin (right axis, log)"),
        Line2D([], [], color="0.7", ls="--", label="perfect calibration"),
    ]
    axes[len(scores.labels)].legend(handles=handles, loc="upper left", fontsize=10, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.96, bottom=0.04, top=0.93, wspace=0.38, hspace=0.42)
    save_png(fig, path)
    plt.close(fig)


def _ece_title(analysis: Analysis | None, focus: str, label: str) -> str:
    """ "\nECE 0.050 → 0.021 (platt)" for a reliability panel (empty without a calibration table)."""
    if analysis is None or analysis.calibration is None:
        return ""
    t = analysis.calibration
    rows = t[(t["member"] == focus) & (t["label"] == label)].set_index("variant")
    text = f"\nECE {fmt(rows.loc['raw', 'ece_width'])}"
    if "calibrated" in rows.index:
        text += f" → {fmt(rows.loc['calibrated', 'ece_width'])} (map: {rows.loc['calibrated', 'method']})"
    return text


def _legend_panel(axes, styles, tuned, focus: str, kind: str, n_labels: int = len(LABELS)) -> None:
    from matplotlib.lines import Line2D

    for ax in axes[n_labels:]:
        ax.axis("off")
    handles = [Line2D([], [], color=st["color"], lw=st["lw"], label=st["label"]) for st in styles.values()]
    for name in ("0.5", *(k for k in tuned.get(focus, {}) if k in _MARKERS)):
        marker, text = _MARKERS[name]
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                ms=8,
                mfc="none",
                mec="red",
                mew=1.6,
                ls="none",
                label=f"{focus} threshold: {text}",
            )
        )
    chance = "chance (diagonal)" if kind == "roc" else "chance (prevalence)"
    handles.append(Line2D([], [], color="0.7", lw=0.8, ls="--", label=chance))
    axes[n_labels].legend(handles=handles, loc="upper left", fontsize=10, frameon=False)


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())
