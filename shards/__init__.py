"""NIH ChestX-ray14 → patient-level splits → WebDataset shards (no torch here)."""
__version__ = "0.1.0"
