"""Typing a section: each value checked against its field's type hint (why hand-written: cxr/config/__init__.py)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from cxr.config.sections import RETIRED, ModelConfig
from cxrbase.errors import CxrError


def _build_section(section: str, cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig:
        values = _split_model_options(values, names)
    kwargs = {}
    for key, value in values.items():
        if key in RETIRED.get(section, {}):
            continue
        if key not in names:
            raise CxrError(f"unknown key {section}.{key} — valid keys of {section}: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # CxrError (an Exception, not a ValueError) passes through
        raise CxrError(f"section {section}: {err} — fix the config") from None


def _split_model_options(values: dict, names: list[str]) -> dict:
    """Move keys of the flat ``model:`` section that are not ModelConfig fields into ``options``,
    checked and typed against ``cxr.models.REGISTRY[name].options``."""
    options = dict(values.pop("options", None) or {})
    for key in [k for k in values if k not in names]:
        options[key] = values.pop(key)
    name = values.get("name", ModelConfig.name)
    valid = model_options(name)
    if valid is not None:  # an unregistered name: the model.name check reports it
        for key in options:
            if key not in valid:
                shown = ", ".join([n for n in names if n != "options"] + list(valid))
                raise CxrError(f"unknown key model.{key} for model.name={name} — valid keys of model: {shown}")
            options[key] = _coerce(f"model.{key}", options[key], valid[key])
    if options:
        values["options"] = options
    return values


def model_options(name: str) -> dict[str, type] | None:
    """{option: type} of the family options of model ``name`` (None: not a registered model,
    which the ``name`` check reports)."""
    from cxr.models import REGISTRY

    spec = REGISTRY.get(name)
    return dict(spec.options) if spec is not None else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint of ``key``; return it converted (int→float etc.)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if origin is Literal:
        if isinstance(value, bool) and ("no" if not value else "yes") in args:
            value = "no" if not value else "yes"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            raise CxrError(f"{key}={value!r}: invalid — valid choices: {' | '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise CxrError(f"{key}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CxrError(f"{key}={value!r}: expected an integer")
        return value
    if hint is float:  # YAML 1.1 reads "1e-4" (no dot) as a string: accept it as the number it plainly is
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise CxrError(f"{key}={value!r}: expected a number, e.g. 3e-4")
        if not math.isfinite(number):  # `.nan` / `.inf` are YAML floats; nothing here means them
            raise CxrError(f"{key}={value!r}: must be a finite number, not nan or inf — e.g. 3e-4")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CxrError(f"{key}={value!r}: expected a string")
        return str(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise CxrError(f"{key}={value!r}: expected a list of {len(args) or 'some'} values, e.g. [0.9, 0.999]")
        hints = args if origin is tuple else (args[0],) * len(value) if args else (Any,) * len(value)
        return origin(_coerce(key, v, h) for v, h in zip(value, hints))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise CxrError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return value
