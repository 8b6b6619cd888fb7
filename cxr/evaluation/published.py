"""Published per-label test AUROC on NIH ChestX-ray14, for the report's comparison columns.

Values are those of SPEC.md. They are context, not a target: Wang et al. 2017 used
the official patient-level test list (25,596 images), so a model evaluated on
`--split test` of an `official` packing is on the same images; CheXNet (Rajpurkar
et al. 2017) used its own random patient split at 224 px, so its column is not
directly comparable with any number this package reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrbase.labels import LABELS


@dataclass(frozen=True)
class PublishedColumn:
    """One published result: a short column name, its caveat and per-label AUROC."""

    name: str
    split: str
    comparable: bool
    note: str
    auroc: dict[str, float]


WANG_2017 = PublishedColumn(
    name="Wang 2017",
    split="official",
    comparable=True,
    note="Wang et al., ChestX-ray8, CVPR 2017 — official test list (same images as an `official` packing's test split)",
    auroc=dict(
        zip(LABELS, (0.700, 0.810, 0.703, 0.805, 0.759, 0.833, 0.786, 0.872, 0.661, 0.693, 0.669, 0.684, 0.658, 0.799))
    ),
)

CHEXNET_2017 = PublishedColumn(
    name="CheXNet 2017",
    split="own random split, 224 px",
    comparable=False,
    note="Rajpurkar et al., CheXNet, 2017 — its own random patient split at 224 px: not directly comparable",
    auroc=dict(
        zip(LABELS, (0.809, 0.925, 0.790, 0.888, 0.864, 0.937, 0.805, 0.916, 0.735, 0.868, 0.780, 0.806, 0.768, 0.889))
    ),
)

PUBLISHED: tuple[PublishedColumn, ...] = (WANG_2017, CHEXNET_2017)


def published_mean(column: PublishedColumn) -> float:
    """Unweighted mean of a column's 14 per-label AUROCs (as papers report it)."""
    return sum(column.auroc[label] for label in LABELS) / len(LABELS)
