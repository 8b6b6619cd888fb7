"""The evaluation's numbers, tables, figures and report.md, from scores already inferred.

Input: a :class:`ScoreSet` per split (keys, 0/1 truth and each member's and the
ensemble's probabilities). :func:`analyse` computes, with ``cxr.metrics``:

- ``aucs`` — per member and label (+ ``mean``): AUROC with a percentile-bootstrap CI
  (all score sets share the same resamples), AUPRC, prevalence, positives, images;
- ``thresholds`` — per member and label, the F1- and Youden-optimal thresholds on the
  tuning split (normally ``val``);
- ``metrics`` — sensitivity, specificity, PPV, NPV, F1 per label and macro/micro,
  Hamming loss and exact match, at 0.5 and at the tuned thresholds.

:func:`write_outputs` writes aucs.csv, thresholds.json, metrics.csv, roc.png, pr.png
and report.md atomically. Nothing here loads models.
"""
from __future__ import annotations

import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

ENSEMBLE = "ensemble"
MEAN = "mean"
THRESHOLD_SETS = ("0.5", "f1", "youden")
METRIC_COLUMNS = ("sensitivity", "specificity", "ppv", "npv", "f1")


@dataclass
class ScoreSet:
    """Scores of one split: keys [N], truth y_true [N, L] 0/1, scores {member: [N, L] probabilities}."""

    keys: np.ndarray
    y_true: np.ndarray
    scores: dict[str, np.ndarray]
    duplicates: int = 0
    labels: tuple[str, ...] = LABELS  # the L column names (the shards' labels)

    @property
    def n(self) -> int:
        """Number of images."""
        return int(len(self.keys))

    def deduplicated(self) -> "ScoreSet":
        """Sorted by key with repeated keys dropped (first kept), the drop counted in ``duplicates``."""
        keys = np.asarray(self.keys, dtype=object).astype(str)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if keys.size else np.zeros(0, bool)
        keep = order[first]
        return ScoreSet(
            keys=keys[keep].astype(object), y_true=self.y_true[keep],
            scores={k: v[keep] for k, v in self.scores.items()},
            duplicates=self.duplicates + int(keys.size - keep.size), labels=self.labels,
        )


@dataclass
class Analysis:
    """Everything computed from the scores: the three tables and the tuned thresholds."""

    aucs: pd.DataFrame
    metrics: pd.DataFrame
    thresholds: dict[str, Any]
    tuned: dict[str, dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ analysis ---

class _Notes:
    """Collect metric warnings (undefined labels, zero denominators) once each, in order."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def run(self, fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        for w in caught:
            text = str(w.message)
            if text not in self.items:
                self.items.append(text)
        return out


FEW_POSITIVES = 10  # labels with fewer positives than this are flagged in aucs.csv and report.md


def auc_table(scores: ScoreSet, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
              notes: _Notes | None = None, progress: bool = True) -> pd.DataFrame:
    """Per member and label (+ ``mean``): auroc, ci_low, ci_high, auprc, prevalence, n_pos, n.

    The CIs are percentile-bootstrap intervals at level 1 − alpha over images; every
    member and the ensemble use the same resamples (``cxr.metrics.bootstrap_counts``
    with ``seed``). ``n_boot=0`` leaves the CI columns NaN.
    """
    from cxrbase.progress import progress as progress_bar

    from cxr.metrics import bootstrap_auroc, bootstrap_counts, per_label_auprc, per_label_auroc

    notes = notes or _Notes()
    y, names = scores.y_true, list(scores.scores)
    counts = bootstrap_counts(scores.n, n_boot, seed) if n_boot > 0 else None
    boots = []
    for m in progress_bar(names, desc=f"AUROC + {n_boot} bootstrap CIs", unit="score set", disable=not progress):
        if counts is not None:  # one resample matrix for all: paired CIs
            boots.append(notes.run(bootstrap_auroc, y, scores.scores[m], alpha=alpha, counts=counts))
        else:
            boots.append(_point_only(notes.run(per_label_auroc, y, scores.scores[m])))
    prevalence, n_pos = y.mean(axis=0), y.sum(axis=0)
    rows = []
    for member, boot in zip(names, boots):
        auprc = notes.run(per_label_auprc, y, scores.scores[member])
        valid = boot.get("n_valid_labels", np.zeros(len(scores.labels), int))
        for c, label in enumerate(scores.labels):
            rows.append((member, label, boot["auroc"][c], boot["ci_low"][c], boot["ci_high"][c],
                         auprc[c], prevalence[c], int(n_pos[c]), scores.n, int(valid[c]), n_boot,
                         bool(n_pos[c] < FEW_POSITIVES)))
        rows.append((member, MEAN, boot["mean_auroc"], boot["mean_ci_low"], boot["mean_ci_high"],
                     _nanmean(auprc), float(prevalence.mean()), int(n_pos.sum()), scores.n,
                     int(boot.get("n_valid", 0)), n_boot, bool((n_pos < FEW_POSITIVES).any())))
    # n_valid: resamples (of n_boot) in which the AUROC is defined; few_positives: < FEW_POSITIVES
    # positives in this split (the mean row: any label has), so the CI rests on very few images
    return pd.DataFrame(rows, columns=["member", "label", "auroc", "ci_low", "ci_high", "auprc",
                                       "prevalence", "n_pos", "n", "n_valid", "n_boot", "few_positives"])


def _point_only(auroc: np.ndarray) -> dict[str, Any]:
    nan = np.full_like(auroc, np.nan)
    return {"auroc": auroc, "ci_low": nan, "ci_high": nan, "mean_auroc": _nanmean(auroc),
            "mean_ci_low": math.nan, "mean_ci_high": math.nan}


def _nanmean(x: np.ndarray) -> float:
    finite = np.asarray(x, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def tune_all(tuning: ScoreSet, members: Sequence[str], notes: _Notes | None = None
             ) -> dict[str, dict[str, np.ndarray]]:
    """{member: {"f1": [L], "youden": [L]}} thresholds tuned on the ``tuning`` split."""
    from cxr.metrics import tune_thresholds

    notes = notes or _Notes()
    missing = [m for m in members if m not in tuning.scores]
    if missing:
        raise CxrError(f"thresholds split: no predictions for members {missing} — infer the "
                       "tuning split with the same members (or pass --thresholds-from none)")
    return {m: {method: notes.run(tune_thresholds, tuning.y_true, tuning.scores[m], method)
                for method in ("f1", "youden")} for m in members}


def metrics_table(scores: ScoreSet, tuned: dict[str, dict[str, np.ndarray]] | None,
                  notes: _Notes | None = None) -> pd.DataFrame:
    """Threshold metrics per member × threshold set (0.5, f1, youden) × label, macro, micro.

    Columns: member, thresholds, label, threshold, sensitivity, specificity, ppv, npv,
    f1, tp, fp, tn, fn, hamming_loss, exact_match (the last two are whole-matrix
    numbers, given on the macro and micro rows).
    """
    from cxr.metrics import threshold_metrics

    notes = notes or _Notes()
    rows = []
    for member, probs in scores.scores.items():
        sets = {"0.5": np.full(len(scores.labels), 0.5)}
        if tuned:
            sets.update(tuned[member])
        for set_name, thr in sets.items():
            tm = notes.run(threshold_metrics, scores.y_true, probs, thr)
            for c, label in enumerate(scores.labels):
                rows.append({"member": member, "thresholds": set_name, "label": label,
                             "threshold": float(thr[c]), **{k: float(tm[k][c]) for k in METRIC_COLUMNS},
                             **{k: int(tm[k][c]) for k in ("tp", "fp", "tn", "fn")}})
            for avg in ("macro", "micro"):
                rows.append({"member": member, "thresholds": set_name, "label": avg,
                             **tm[avg], "hamming_loss": tm["hamming_loss"],
                             "exact_match": tm["exact_match"]})
    columns = ["member", "thresholds", "label", "threshold", *METRIC_COLUMNS,
               "tp", "fp", "tn", "fn", "hamming_loss", "exact_match"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    return table.astype({k: "Int64" for k in ("tp", "fp", "tn", "fn")})


def thresholds_document(tuned: dict[str, dict[str, np.ndarray]], split: str, n: int,
                        labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """The thresholds.json document: per member, per method, per label."""
    return {
        "tuned_on": split, "n_images": n,
        "rule": "predict positive when probability >= threshold",
        "methods": {"f1": "maximises F1 per label", "youden": "maximises TPR - FPR per label"},
        "members": {m: {method: dict(zip(labels, map(float, thr))) for method, thr in by.items()}
                    for m, by in tuned.items()},
    }


def read_thresholds(path: str | Path) -> dict[str, Any]:
    """A thresholds.json written by :func:`write_outputs` (the document of :func:`thresholds_document`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CxrError(f"{path}: unreadable thresholds ({err}) — pass the evaluator's REPORT/thresholds.json "
                       f"(python -m cxr.evaluate --runs ... --out REPORT)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("members"), dict):
        raise CxrError(f"{path}: not an evaluator thresholds.json (no \"members\") — pass REPORT/thresholds.json "
                       f"written by python -m cxr.evaluate")
    return doc


def analyse(scores: ScoreSet, tuning: ScoreSet | None, *, tuning_split: str | None,
            n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Analysis:
    """All numbers of the report: AUROC/CI/AUPRC table, tuned thresholds, threshold metrics."""
    notes, seconds = _Notes(), {}
    t0 = time.perf_counter()
    aucs = auc_table(scores, n_boot=n_boot, seed=seed, alpha=alpha, notes=notes)
    seconds["aucs"] = time.perf_counter() - t0
    tuned: dict[str, dict[str, np.ndarray]] = {}
    if tuning is not None:
        tuned = tune_all(tuning, list(scores.scores), notes)
    t1 = time.perf_counter()
    metrics = metrics_table(scores, tuned, notes)
    seconds["thresholds+metrics"] = time.perf_counter() - t1
    doc = thresholds_document(tuned, tuning_split or "", tuning.n if tuning is not None else 0,
                              scores.labels)
    return Analysis(aucs=aucs, metrics=metrics, thresholds=doc, tuned=tuned,
                    notes=notes.items, seconds=seconds)


# ------------------------------------------------------------------- figures ---

def _operating_points(y: np.ndarray, s: np.ndarray, tuned: dict[str, np.ndarray], c: int
                      ) -> dict[str, tuple[float, float, float]]:
    """(FPR, TPR, precision) on this split at 0.5 and each tuned threshold of label c."""
    points = {}
    for name, thr in {"0.5": 0.5, **{k: v[c] for k, v in tuned.items()}}.items():
        pred = s >= thr
        tp, fp = float((pred & y).sum()), float((pred & ~y).sum())
        n_pos, n_neg = float(y.sum()), float((~y).sum())
        points[name] = (fp / n_neg if n_neg else math.nan, tp / n_pos if n_pos else math.nan,
                        tp / (tp + fp) if tp + fp else math.nan)
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


def _panel_grid(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(15, 15), dpi=100)
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


def plot_curves(path: Path, scores: ScoreSet, aucs: pd.DataFrame,
                tuned: dict[str, dict[str, np.ndarray]], kind: str, split: str) -> None:
    """Write roc.png (kind="roc") or pr.png (kind="pr"): 14 panels, members + ensemble,
    the ensemble's operating points (0.5, F1- and Youden-tuned thresholds) marked."""
    title = {"roc": "ROC", "pr": "Precision–recall"}[kind]
    plt, fig, axes = _panel_grid(f"{title} curves — split '{split}', {scores.n} images")
    styles = _member_styles(list(scores.scores))
    metric = "auroc" if kind == "roc" else "auprc"
    lookup = aucs.set_index(["member", "label"])[metric]
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    for c, (ax, label) in enumerate(zip(axes, scores.labels)):
        y = scores.y_true[:, c].astype(bool)
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
            tp, fp = _cumulative_counts(y, scores.scores[member][:, c])
            if kind == "roc":
                ax.plot(*_thin(fp / fp[-1], tp / tp[-1]), **styles[member])
            else:
                ax.plot(*_thin(tp[1:] / tp[-1], tp[1:] / (tp[1:] + fp[1:])), drawstyle="steps-pre",
                        **styles[member])
        points = _operating_points(y, scores.scores[focus][:, c], tuned.get(focus, {}), c)
        for name, (fpr, tpr, ppv) in points.items():
            marker, text = _MARKERS[name]
            xy = (fpr, tpr) if kind == "roc" else (tpr, ppv)
            ax.plot(*xy, marker=marker, ms=8, mfc="none", mec="red", mew=1.6, ls="none",
                    label=f"{focus} @ {text}")
    _legend_panel(axes, styles, tuned, focus, kind, len(scores.labels))
    # fixed margins: tight_layout would cost a second full draw
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.94, wspace=0.28, hspace=0.32)
    _save_png(fig, path)
    plt.close(fig)


def _legend_panel(axes, styles, tuned, focus: str, kind: str, n_labels: int = len(LABELS)) -> None:
    from matplotlib.lines import Line2D

    for ax in axes[n_labels:]:
        ax.axis("off")
    handles = [Line2D([], [], color=st["color"], lw=st["lw"], label=st["label"]) for st in styles.values()]
    for name in ("0.5", *tuned.get(focus, {})):
        marker, text = _MARKERS[name]
        handles.append(Line2D([], [], marker=marker, ms=8, mfc="none", mec="red", mew=1.6, ls="none",
                              label=f"{focus} threshold: {text}"))
    chance = "chance (diagonal)" if kind == "roc" else "chance (prevalence)"
    handles.append(Line2D([], [], color="0.7", lw=0.8, ls="--", label=chance))
    axes[n_labels].legend(handles=handles, loc="upper left", fontsize=10, frameon=False)


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


# ------------------------------------------------------------------- tables ----

def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def auroc_wide(aucs: pd.DataFrame, with_ci: bool = True) -> pd.DataFrame:
    """Label × member table of AUROC strings ("0.812 [0.80, 0.83]") plus prevalence (%)."""
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    first = aucs[aucs["member"] == members[0]].set_index("label")
    table["prevalence %"] = [_fmt(100 * first.loc[label, "prevalence"], 2) for label in table.index]
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [
            _fmt(r.auroc) + (f" [{_fmt(r.ci_low, 2)}, {_fmt(r.ci_high, 2)}]"
                             if with_ci and np.isfinite(r.ci_low) else "")
            for r in (rows.loc[label] for label in table.index)]
    table.index.name = "label"
    return table


def _label_rows(aucs: pd.DataFrame) -> list[str]:
    """The table's labels in their order, then the mean row."""
    return [*dict.fromkeys(label for label in aucs["label"] if label != MEAN), MEAN]


def format_stdout_table(aucs: pd.DataFrame) -> str:
    """The per-label AUROC table (members and ensemble, with CIs) as fixed-width text."""
    return auroc_wide(aucs).to_string()


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    frame = frame.reset_index() if index else frame
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _published_columns(table: pd.DataFrame) -> pd.DataFrame:
    from cxr.published import PUBLISHED, published_mean

    if [label for label in table.index if label != MEAN] != list(LABELS):
        return table  # published numbers exist only for the 14 NIH labels
    for column in PUBLISHED:
        name = column.name + ("" if column.comparable else " †")
        table[name] = [_fmt(column.auroc[label]) if label in column.auroc else _fmt(published_mean(column))
                       for label in table.index]
    return table


def _auprc_wide(aucs: pd.DataFrame) -> pd.DataFrame:
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [_fmt(rows.loc[label, "auprc"]) for label in table.index]
    table.index.name = "label"
    return table


def _threshold_summary(metrics: pd.DataFrame, member: str) -> pd.DataFrame:
    rows = metrics[(metrics["member"] == member) & metrics["label"].isin(["macro", "micro"])]
    out = pd.DataFrame({
        "thresholds": rows["thresholds"], "average": rows["label"],
        **{name: rows[name].map(_fmt) for name in METRIC_COLUMNS},
        "Hamming loss": rows["hamming_loss"].map(_fmt), "exact match": rows["exact_match"].map(_fmt),
    })
    return out


def _members_table(members: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for m in members:
        options = ", ".join(f"{k}={v}" for k, v in (m.get("model_options") or {}).items()
                            if v not in (None, False, "none", 0, 0.0))
        best_val = m.get("best_val")
        if isinstance(best_val, dict):
            best_val = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in best_val.items())
        rows.append({"member": m.get("name"), "model": m.get("model"), "options": options or "—",
                     "loss": m.get("loss") or "—", "lr": m.get("lr") if m.get("lr") is not None else "—",
                     "seed": m.get("seed") if m.get("seed") is not None else "—",
                     "train px": m.get("train_resolution") or "—", "eval px": m.get("eval_resolution") or "—",
                     "best epoch": m.get("best_epoch") if m.get("best_epoch") is not None else "—",
                     "best val": best_val or "—", "run dir": f"`{m.get('run_dir')}`"})
    return pd.DataFrame(rows)


def _validity_note(aucs: pd.DataFrame, focus: str) -> str:
    """How many resamples each CI rests on, and which labels have too few positives (report.md)."""
    rows = aucs[aucs["member"] == focus].set_index("label")
    n_boot = int(rows["n_boot"].iloc[0])
    text = (f"the mean-AUROC CI is a per-label-mean bootstrap (each resample's mean over the labels "
            f"with both classes in it): `{focus}` mean from {int(rows.loc[MEAN, 'n_valid'])} of {n_boot} "
            f"valid resamples")
    partial = [f"{label} {int(rows.loc[label, 'n_valid'])}/{n_boot}" for label in rows.index
               if label != MEAN and 0 < rows.loc[label, "n_valid"] < n_boot]
    if partial:
        text += "; labels defined in fewer resamples: " + ", ".join(partial)
    return text


def _few_positives_note(aucs: pd.DataFrame) -> list[str]:
    """A report.md bullet naming the labels with fewer than FEW_POSITIVES positives (or nothing)."""
    rows = aucs[aucs["member"] == aucs["member"].iloc[0]].set_index("label")
    few = [f"{label} ({int(rows.loc[label, 'n_pos'])})" for label in rows.index
           if label != MEAN and rows.loc[label, "few_positives"]]
    if not few:
        return []
    return [f"- **labels with fewer than {FEW_POSITIVES} positives** (their AUROC and CI rest on very few "
            f"images; `few_positives` in aucs.csv): " + ", ".join(few)]


def report_markdown(analysis: Analysis, scores: ScoreSet, *, split: str, context: dict[str, Any],
                    members: Sequence[dict[str, Any]]) -> str:
    """report.md: per-label AUROC of members vs ensemble with published columns, AUPRC,
    threshold metrics, run configs and figures. ``context``: split-level facts
    (ensemble method, bootstrap, seed, alpha, thresholds split, shards, source)."""
    from cxr.published import CHEXNET_2017, WANG_2017

    level = round(100 * (1 - context.get("alpha", 0.05)))
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    boot = context.get("bootstrap", 0)
    lines = [
        f"# Evaluation report — split `{split}`", "",
        f"- images: {scores.n}; members: {len([m for m in scores.scores if m != ENSEMBLE])}; "
        f"ensemble: {context.get('ensemble', 'mean-prob')} of the members' outputs",
        f"- AUROC CI: {level} % percentile bootstrap over images, {boot} resamples shared by all "
        f"members and the ensemble (seed {context.get('seed', 0)}); {_validity_note(analysis.aucs, focus)}"
        if boot else "- AUROC CI: none (--bootstrap 0)",
        *_few_positives_note(analysis.aucs),
        f"- thresholds tuned on split `{context.get('thresholds_from')}` "
        f"({analysis.thresholds.get('n_images', 0)} images)" if analysis.tuned else "- thresholds: 0.5 only",
        f"- source: {context.get('source', '')}",
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
        f"## Per-label AUROC ({level} % CI) — members vs ensemble", "",
        _markdown(_published_columns(auroc_wide(analysis.aucs))), "",
        f"Prevalence is that of this split (`{split}`). Published columns: {WANG_2017.note}; "
        f"comparable only if this split is that official test list (25,596 images; this one has "
        f"{scores.n}). † {CHEXNET_2017.note}. Their mean rows are the unweighted means of the 14 labels.",
        "",
        "## AUPRC (chance level = prevalence)", "", _markdown(_auprc_wide(analysis.aucs)), "",
        f"## Threshold metrics of `{focus}` on `{split}`", "",
        _markdown(_threshold_summary(analysis.metrics, focus), index=False), "",
        "Per-label values for every member are in `metrics.csv`; thresholds in `thresholds.json`.", "",
        "## Members (run configs)", "",
        _markdown(_members_table(members), index=False) if members else "(not recorded)", "",
        "## Figures", "", "![ROC curves](roc.png)", "", "![Precision-recall curves](pr.png)", "",
    ]
    notes = list(analysis.notes) + list(context.get("notes", []))
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def write_outputs(out: Path, analysis: Analysis, scores: ScoreSet, *, split: str,
                  context: dict[str, Any], members: Sequence[dict[str, Any]],
                  figures: bool = True) -> dict[str, float]:
    """Write aucs.csv, thresholds.json, metrics.csv, roc.png, pr.png, report.md (atomic).

    Returns seconds spent per group (tables, figures).
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    atomic_write_text(out / "aucs.csv", analysis.aucs.to_csv(index=False))
    atomic_write_text(out / "metrics.csv", analysis.metrics.to_csv(index=False))
    atomic_write_text(out / "thresholds.json", json.dumps(analysis.thresholds, indent=2) + "\n")
    seconds = {"tables": time.perf_counter() - t0}
    if figures:
        t1 = time.perf_counter()
        plot_curves(out / "roc.png", scores, analysis.aucs, analysis.tuned, "roc", split)
        plot_curves(out / "pr.png", scores, analysis.aucs, analysis.tuned, "pr", split)
        seconds["figures"] = time.perf_counter() - t1
    atomic_write_text(out / "report.md", report_markdown(analysis, scores, split=split,
                                                         context=context, members=members))
    return seconds
