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

# Unknown and uncertain labels (docs/shards-format.md). A splits table's label cell is 1, 0, -1
# (uncertain, as CheXpert/MIMIC write it) or missing (unknown: the data set does not say). Pack
# resolves -1 by the --uncertain policy; on disk `.labels` stays uint8 with UNKNOWN = 255 for a
# masked entry, and the loaders give NaN there. Losses and metrics skip masked entries.
UNKNOWN = 255
UNCERTAIN = -1
# pack --uncertain: -1 → masked / 0 / 1 (the CheXpert paper's U-Ignore, U-Zeros, U-Ones)
UNCERTAIN_POLICIES: tuple[str, ...] = ("ignore", "zeros", "ones")

# The non-label columns of a splits table; every other column of a generic table is a label.
TABLE_FIELDS: tuple[str, ...] = ("image", "patient", "split", "age", "sex", "view")


def table_labels(columns) -> list[str]:
    """The label columns of a splits table: the 14 NIH labels when all are present (an extra
    ``No Finding`` column stays out), else every column that is not one of TABLE_FIELDS, in order."""
    columns = list(columns)
    if all(name in columns for name in LABELS):
        return list(LABELS)
    return [c for c in columns if c not in TABLE_FIELDS]


def missing_nih_labels(columns) -> list[str]:
    """The NIH labels a table lacks when it has most (≥ 7) but not all of them: a damaged NIH table,
    not a generic one (which may reuse a few NIH names)."""
    missing = [name for name in LABELS if name not in list(columns)]
    return missing if 0 < len(missing) <= NUM_LABELS // 2 else []


# Fixed-size per-sample metadata vector stored in shards (`.meta`, float32 LE).
# Age is raw years here; loaders z-score it with the train statistics of the manifest.
META_FIELDS: tuple[str, ...] = ("age", "sex_M", "sex_F", "view_PA", "view_AP")


def parse_findings(text: str) -> list[int]:
    """NIH `Finding Labels` string → 14 ints (0/1) in canonical order.

    Exact: split on '|', every name must be one of LABELS or "No Finding";
    "No Finding" stands alone (all zeros). Raises ValueError saying what is wrong
    (the caller adds the file and row).
    """
    names = text.strip().split("|") if isinstance(text, str) else [""]
    vector = [0] * NUM_LABELS
    if names == [NO_FINDING]:
        return vector
    for name in names:
        if name == NO_FINDING:
            raise ValueError(f"'{NO_FINDING}' combined with other labels in '{text}'")
        index = _INDEX.get(name)
        if index is None:
            raise ValueError(
                f"unknown label '{name}' in '{text}' (expected one of {', '.join(LABELS)} or '{NO_FINDING}')"
            )
        if vector[index]:
            raise ValueError(f"label '{name}' repeated in '{text}'")
        vector[index] = 1
    return vector


def format_findings(vector) -> str:
    """14 ints (0/1, canonical order) → NIH `Finding Labels` string ("No Finding" if none)."""
    names = [name for name, on in zip(LABELS, vector) if on]
    return "|".join(names) if names else NO_FINDING
