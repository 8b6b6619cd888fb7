"""cxr: chest X-ray classifiers on NIH ChestX-ray14 at full resolution."""

from cxrbase.version import __version__  # noqa: F401 — one version for all layers
