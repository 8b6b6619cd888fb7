"""NIH ChestX-ray14 → patient-level splits → WebDataset shards (no torch here)."""

from cxrbase.version import __version__  # noqa: F401 — one version for all layers
