"""The scores of one split (:class:`ScoreSet`), what inference hands to the analysis.

The
names of the ensemble's score set and of the labels' mean row live here too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrbase.labels import LABELS

ENSEMBLE = "ensemble"
MEAN = "mean"


@dataclass
class ScoreSet:
    """Scores of one split: keys [N], truth y_true [N, L] 0/1 (float NaN where a label is unknown:
    every analysis uses, per label, the images that know it), scores {member: [N, L] probabilities}."""

    keys: np.ndarray
    y_true: np.ndarray
    scores: dict[str, np.ndarray]
    duplicates: int = 0
    labels: tuple[str, ...] = LABELS  # the L column names (the shards' labels)
    meta: pd.DataFrame | None = (
        None  # per-image columns for subgroups and patient resampling (cxr.evaluation.subgroups)
    )

    @property
    def n(self) -> int:
        """Number of images."""
        return int(len(self.keys))

    def deduplicated(self) -> ScoreSet:
        """Sorted by key with repeated keys dropped (first kept), the drop counted in ``duplicates``."""
        keys = np.asarray(self.keys, dtype=object).astype(str)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if keys.size else np.zeros(0, bool)
        keep = order[first]
        return ScoreSet(
            keys=keys[keep].astype(object),
            y_true=self.y_true[keep],
            scores={k: v[keep] for k, v in self.scores.items()},
            duplicates=self.duplicates + int(keys.size - keep.size),
            labels=self.labels,
            meta=None if self.meta is None else self.meta.iloc[keep].reset_index(drop=True),
        )


def focus_member(scores: ScoreSet) -> str:
    """The score set the report centres on: the ensemble, else the last member."""
    return ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
