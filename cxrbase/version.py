"""The package version: the one place it is written (pyproject.toml reads it, cxr and shards re-export it)."""

__version__ = "0.1.0"
