"""Adapters for public chest X-ray data sets other than NIH ChestX-ray14 (no torch).

Each module reads one data set's published layout under a root folder and returns a
:class:`shards.datasets.common.Loaded` (one row per image: path relative to the root, patient,
age, sex, view, frontal flag, official split, the data set's own findings as 1/0/−1/NA); the
common pipeline filters views, maps the findings onto NIH's 14 labels through the shipped
harmonisation table (labelmap.csv) and assigns patient-level splits. See docs/datasets.md.
"""

ADAPTERS = {
    "chexpert": "shards.datasets.chexpert",
    "mimic": "shards.datasets.mimic",
    "padchest": "shards.datasets.padchest",
    "vindr": "shards.datasets.vindr",
}
DATASETS = ("nih", *ADAPTERS)
