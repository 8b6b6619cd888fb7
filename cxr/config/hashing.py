"""A config out: plain dict, YAML text, config.yaml on disk, and the hash / diff of what it trains."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from cxr.config.loading import Config
from cxr.config.sections import RETIRED, SECTIONS, UNHASHED, ModelConfig
from cxrbase.atomic import atomic_write_text


def config_to_dict(cfg: Config) -> dict:
    """Plain ``{section: {key: value}}`` with the model options flat (as in config.yaml)."""
    out = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        if isinstance(section, ModelConfig):
            out[name] = section.kwargs()
            if section.init_from is not None:  # written only when set: older run dirs keep their hash
                out[name]["init_from"] = section.init_from
        else:
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (sections in fixed order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to ``path`` atomically."""
    atomic_write_text(path, config_yaml(cfg))


def hashed_dict(cfg: Config) -> dict:
    """The part of the config that decides what is trained (input of :func:`config_hash`)."""
    full = config_to_dict(cfg)
    return {
        s: {**RETIRED.get(s, {}), **{k: v for k, v in keys.items() if k not in UNHASHED.get(s, ())}}
        for s, keys in full.items()
    }


def config_hash(cfg: Config) -> str:
    """16-hex fingerprint of :func:`hashed_dict` (stable across key order and runs)."""
    text = json.dumps(hashed_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(a: Config | dict, b: Config | dict) -> list[str]:
    """Keys (``section.key``) whose hashed values differ between two configs."""
    da = a if isinstance(a, dict) else hashed_dict(a)
    db = b if isinstance(b, dict) else hashed_dict(b)
    keys = {(s, k) for d in (da, db) for s, sec in d.items() for k in sec}
    return sorted(f"{s}.{k}" for s, k in keys if da.get(s, {}).get(k) != db.get(s, {}).get(k))
