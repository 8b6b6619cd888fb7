"""The 14 ChestX-ray14 labels in canonical order (SPEC.md) and exact parsing."""
from __future__ import annotations

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
NUM_LABELS = len(LABELS)
_INDEX = {name: i for i, name in enumerate(LABELS)}

# Fixed-size per-sample metadata vector stored in shards (`.meta`, float32 LE).
# Age is raw years here; loaders z-score it with the train statistics of the manifest.
META_FIELDS: tuple[str, ...] = ("age", "sex_M", "sex_F", "view_PA", "view_AP")
