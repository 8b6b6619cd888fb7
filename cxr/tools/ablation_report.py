"""The ablation report's training costs (time, throughput, memory, the layout the probe chose)
and its rendering: ablation.md's tables and the AUROC and delta figures (cxr.tools.ablation runs
the analysis and writes them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.scores import MEAN
from cxr.runs.run_log import read_throughput
from cxr.training.probe import read_probe
from cxrbase.errors import CxrError

ALL = "ensemble of all"  # the variant that averages every run of the sweep


def run_costs(runs: Sequence[Any]) -> pd.DataFrame:  # runs: cxr.tools.ablation.Run (that module imports this one)
    """Per run: variant, seed, micro-batch, accumulation, checkpointing, images/s, s/epoch, peak memory."""
    rows = []
    for r in runs:
        data, train, model = r.config.data, r.config.train, r.config.model
        row = {
            "run": r.name,
            "variant": str(r.variant),
            "seed": r.seed,
            "resolution": data.resolution,
            "micro_batch": data.batch_size,
            "grad_accum": train.grad_accum_steps,
            "checkpointing": model.grad_checkpointing,
        }
        row["effective_batch"] = (row["micro_batch"] or 0) * (row["grad_accum"] or 1)
        frame = read_throughput(r.run_dir)  # one row per epoch (cxr.runs.run_log)
        for column, out in (
            ("train_images_per_s", "images_per_s"),
            ("epoch_seconds", "s_per_epoch"),
            ("peak_memory_mb", "peak_memory_mb"),
        ):
            row[out] = float(frame[column].median()) if column in frame and len(frame) else np.nan
        if "peak_memory_mb" in frame and len(frame):
            row["peak_memory_mb"] = float(frame["peak_memory_mb"].max())
        row["epochs"] = len(frame)
        row["image_source"] = _image_source(r.run_dir)
        probe = read_probe(r.run_dir)
        row["probe_peak_mb"] = probe.peak_mb if probe else np.nan
        row["layout_note"] = (probe.differs_from_config() or "") if probe else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _layout_notes(costs: pd.DataFrame) -> list[str]:
    """Lines naming the runs whose probed micro-batch or checkpointing is not their config's."""
    if not len(costs) or "layout_note" not in costs:
        return []
    notes = [f"- {r.run}: the memory probe chose {r.layout_note}" for r in costs.itertuples() if r.layout_note]
    if not notes:
        return []
    return [
        "**Batch layout differs from the config** (BatchNorm statistics differ between these runs "
        "and the others; RUN/probe.json says why):",
        "",
        *notes,
        "",
    ]


def _image_source(run_dir: Path) -> str:
    """The images a run trained on, from its best checkpoint's meta.json (cxr.train)."""
    from cxr.runs.checkpoint import read_meta  # the owner of meta.json (imports torch: only when a report is made)

    try:
        images = read_meta(run_dir / "checkpoints" / "best").get("images") or {}
    except CxrError:
        return "—"
    return images.get("source", "—") + (f" ({images['resize_filter']})" if images.get("resize_filter") else "")


def cost_summary(costs: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean ± sd across seeds of images/s, s/epoch, peak memory; the batch layout."""
    out = []
    for variant, part in costs.groupby("variant", sort=False):
        row = {
            "variant": variant,
            "runs": len(part),
            "micro-batch × accum": ", ".join(
                sorted({f"{int(a)}×{int(b)}" for a, b in zip(part.micro_batch.fillna(0), part.grad_accum.fillna(1))})
            ),
            "checkpointing": ", ".join(sorted({str(bool(c)) for c in part.checkpointing})),
        }
        for column, title in (("images_per_s", "images/s"), ("s_per_epoch", "s/epoch"), ("peak_memory_mb", "peak MB")):
            values = part[column].dropna()
            row[title] = _mean_sd(values.to_numpy(), 1 if column != "peak_memory_mb" else 0)
        row["images"] = "; ".join(sorted(set(part.image_source)))
        out.append(row)
    return pd.DataFrame(out)


def _mean_sd(values: np.ndarray, digits: int) -> str:
    if values.size == 0:
        return "—"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(float(x)) else f"{float(x):.{digits}f}"


def _p(x: Any) -> str:
    if x is None or not np.isfinite(float(x)):
        return "—"
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def _labels(table: pd.DataFrame) -> list[str]:
    """The per-label rows' names of a result table, in table order (the shards' labels: the 14 NIH
    ones or any data set's), without the mean."""
    return [label for label in dict.fromkeys(table["label"]) if label != MEAN]


def auroc_markdown(table: pd.DataFrame, order: Sequence[str]) -> str:
    """Label × variant AUROC [95 % CI] (and mean ± sd across seeds when > 1)."""
    from cxr.evaluation.tables import markdown_table

    wide = pd.DataFrame(index=[MEAN, *_labels(table)])
    for v in [*order, ALL]:
        part = table[table.variant == v].set_index("label")
        cells = []
        for label in wide.index:
            r = part.loc[label]
            cell = f"{_fmt(r.auroc)} [{_fmt(r.ci_low, 2)}, {_fmt(r.ci_high, 2)}]"
            if v != ALL and r.get("seeds", 1) and float(r.get("seeds", 1)) > 1:
                cell += f" (seeds {_fmt(r.seeds_mean)} ± {_fmt(r.seeds_sd)})"
            cells.append(cell)
        wide[v] = cells
    wide.index.name = "label"
    return markdown_table(wide)


def delta_markdown(table: pd.DataFrame, order: Sequence[str], reference: str) -> str:
    """Label × variant: ΔAUROC vs the reference [paired bootstrap CI], Holm p, significance mark."""
    from cxr.evaluation.tables import markdown_table

    wide = pd.DataFrame(index=[MEAN, *_labels(table)])
    for v in [*order, ALL]:
        if v == reference:
            continue
        part = table[table.variant == v].set_index("label")
        wide[f"{v} − {reference}"] = [
            f"{_fmt(r.delta, 3)} [{_fmt(r.delta_ci_low, 3)}, {_fmt(r.delta_ci_high, 3)}] "
            f"p={_p(r.p)} p_Holm={_p(r.p_holm)}{' **✓**' if r.significant else ''}"
            for r in (part.loc[label] for label in wide.index)
        ]
    wide.index.name = "label"
    return markdown_table(wide)


def extras_markdown(table: pd.DataFrame, order: Sequence[str]) -> str:
    """Variant × (ECE, Brier, subgroup gaps) on the mean row."""
    from cxr.evaluation.tables import markdown_table

    columns = [c for c in table.columns if c in ("ece_width", "ece_mass", "brier") or c.startswith("gap_")]
    mean = table[table.label == MEAN].set_index("variant")
    frame = pd.DataFrame(
        {c: [_fmt(mean.loc[v, c]) for v in [*order, ALL]] for c in columns},
        index=pd.Index([*order, ALL], name="variant"),
    )
    return markdown_table(frame)


def report_markdown(result: dict[str, Any], costs: pd.DataFrame, context: dict[str, Any]) -> str:
    from cxr.evaluation.tables import markdown_table

    table, order, ref = result["table"], result["order"], result["reference"]
    significant = table[(table.label != MEAN) & table.significant.fillna(False).astype(bool) & (table.variant != ALL)]
    gains = ", ".join(f"{r.label} at {r.variant} ({r.delta:+.3f})" for r in significant.itertuples()) or "none"
    n = int(table.n.iloc[0]) if len(table) else 0
    lines = [
        f"# Ablation over `{result['by']}`: {', '.join(order)}",
        "",
        f"Split `{context['split']}`, {n} images; {context['runs']} run(s); reference `{ref}`; "
        f"{result['n_boot']} paired bootstrap resamples; alpha {result['alpha']}. Source: {context['source']}.",
        "",
        f"**Significant per-label differences against `{ref}` (DeLong, Holm-corrected over the labels):** {gains}.",
        "",
        "## Test AUROC [95 % bootstrap CI]",
        "",
        "With several seeds a variant is scored by the mean of its seeds' probabilities; "
        "the mean ± sd across the single seeds' AUROCs follows in brackets. "
        f"`{ALL}` is the mean probability of every run of the sweep.",
        "",
        auroc_markdown(table, order),
        "",
        f"## Difference against `{ref}` (paired, same images)",
        "",
        "ΔAUROC [paired bootstrap 95 % CI] with DeLong's two-sided p and the Holm-adjusted p "
        "across the labels; ✓: adjusted p < alpha (for the mean: bootstrap CI excludes 0).",
        "",
        delta_markdown(table, order, ref),
        "",
        "## Calibration and subgroup gaps per variant (mean over the labels)",
        "",
        "ECE (15 bins, equal width / equal mass) and Brier of the raw probabilities (no post-hoc map: the "
        "sweep has no threshold split), and the AUROC gap between subgroups of the split's table "
        "(two groups: the other − the largest; more: highest − lowest band). Per label in `ablation.csv`; "
        "CIs and tests per subgroup: `python -m cxr.evaluate` on a variant.",
        "",
        extras_markdown(table, order),
        "",
        "## Training cost per variant",
        "",
        "images/s and s/epoch are the training loop alone (validation excluded), the median over "
        "epochs; peak memory is torch.cuda.max_memory_allocated on GPU, peak RSS on CPU; "
        "mean ± sd across seeds.",
        "",
        markdown_table(cost_summary(costs), index=False) if len(costs) else "(no runs)",
        "",
        *_layout_notes(costs),
        "Figures: " + ", ".join(f"`{f}`" for f in context.get("figures", [])) if context.get("figures") else "",
    ]
    return "\n".join(lines) + "\n"


def plot_auroc(path: Path, result: dict[str, Any]) -> None:
    """One panel per label (the mean first): AUROC with 95 % CI against the variant."""
    from cxr.evaluation.figures import panel_grid, save_png

    table, order = result["table"], result["order"]
    plt, fig, axes = panel_grid(f"test AUROC vs {result['by']} (95 % bootstrap CI)", len(_labels(table)) + 1)
    x = np.arange(len(order))
    for ax, label in zip(axes, [MEAN, *_labels(table)]):
        part = table[table.label == label].set_index("variant")
        rows = part.loc[order]
        ax.errorbar(
            x,
            rows.auroc,
            yerr=[rows.auroc - rows.ci_low, rows.ci_high - rows.auroc],
            marker="o",
            capsize=3,
            color="tab:blue",
            label="single variant",
        )
        if ALL in part.index:
            ax.axhline(part.loc[ALL, "auroc"], color="black", ls="--", lw=1, label=ALL)
        ax.set_xticks(x, order, fontsize=8)
        ax.set_title(label, fontsize=11, fontweight="bold" if label == MEAN else None)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax in axes[len(_labels(table)) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_delta(path: Path, result: dict[str, Any]) -> None:
    """One panel per label (the mean first): ΔAUROC vs the reference, paired CI, significant filled."""
    from cxr.evaluation.figures import panel_grid, save_png

    table, ref = result["table"], result["reference"]
    others = [v for v in [*result["order"], ALL] if v != ref]
    plt, fig, axes = panel_grid(
        f"ΔAUROC vs {ref} (paired bootstrap 95 % CI; filled: Holm-significant)", len(_labels(table)) + 1
    )
    x = np.arange(len(others))
    for ax, label in zip(axes, [MEAN, *_labels(table)]):
        rows = table[table.label == label].set_index("variant").loc[others]
        ax.axhline(0, color="grey", lw=1)
        ax.errorbar(
            x,
            rows.delta,
            yerr=[rows.delta - rows.delta_ci_low, rows.delta_ci_high - rows.delta],
            fmt="none",
            capsize=3,
            color="tab:red",
        )
        sig = rows.significant.fillna(False).astype(bool).to_numpy()
        ax.scatter(x[sig], rows.delta[sig], color="tab:red", zorder=3)
        ax.scatter(x[~sig], rows.delta[~sig], facecolor="white", edgecolor="tab:red", zorder=3)
        ax.set_xticks(x, others, fontsize=8)
        ax.set_title(label, fontsize=11)
        ax.grid(alpha=0.3)
    for ax in axes[len(_labels(table)) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
