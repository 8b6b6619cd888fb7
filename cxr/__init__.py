"""cxr: chest X-ray classifiers on NIH ChestX-ray14 at full resolution."""
__version__ = "0.1.0"
