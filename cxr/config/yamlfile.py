"""Reading a config file: strict YAML (no duplicate keys), and ``--config`` names of the shipped configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cxrbase.errors import CxrError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently,
    so a second ``data:`` section would drop the first, or ``resolution: 128`` override ``64``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at line "
                    f"{seen[key]}) — keep one of them"
                )
            try:
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    pass


def read_yaml(path: Path) -> Any:
    """A config file's YAML (safe: no Python objects), with a one-line CxrError for text that is not
    UTF-8, not YAML, or has a key twice in one mapping; None for an empty or comment-only file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CxrError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r}) — save it as UTF-8"
        ) from None
    except OSError as err:
        raise CxrError(f"{path}: cannot read ({err.strerror}) — check the path and its permissions") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python objects
    except _DuplicateKey as err:
        raise CxrError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise CxrError(f"{path}: not valid YAML ({str(err).splitlines()[0]}) — fix the syntax") from None


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs shipped inside the package (cxr/configs/*.yaml)."""
    from importlib.resources import files

    folder = files("cxr") / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    }


def resolve_config_path(path: str | Path) -> Path:
    """``--config`` as given: a YAML file, or the name of a shipped config (``densenet121`` or
    ``densenet121.yaml`` → the packaged cxr/configs/densenet121.yaml), from any working directory."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_configs()
    # a bare name, or the repo-relative cxr/configs/NAME.yaml of the docs run from another directory
    if given.parent in (Path("."), Path("cxr/configs")) and given.stem in shipped and given.suffix in ("", ".yaml"):
        return shipped[given.stem]
    raise CxrError(
        f"{path}: config file not found — pass a YAML file or a shipped config name: {', '.join(sorted(shipped))}"
    )
