"""``--help`` text of the config: every key, its default and the docstring written under its field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

from cxr.config.hashing import _plain
from cxr.config.sections import SECTIONS


def describe_config() -> str:
    """Every key with its default and the docstring under its field (for ``--help``)."""
    lines = []
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = _default(f)
            doc = " ".join(docs.get(f.name, "").split())
            lines.append(f"  {name}.{f.name}={_plain(default)!r}")
            if doc:
                lines.extend("      " + ln for ln in textwrap.wrap(doc, 84))
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literals written under dataclass fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):  # getsource of a class is its class statement
        return {}
    body = node.body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (every config field has one: a value or a factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name!r} has no default — give it one")
