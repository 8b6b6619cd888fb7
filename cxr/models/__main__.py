"""``python -m cxr.models list``: each model's name, parameter count (14 labels) and a one-line description."""
from __future__ import annotations

import argparse
from typing import Sequence

from shards.errors import cli_entry

from . import MODEL_NAMES, REGISTRY, build_model, count_parameters


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr.models",
                                     description="The cxr model suite (--debug shows tracebacks of errors).")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print name, parameter count and description of every model")
    listing.add_argument("--num-labels", type=int, default=14, help="outputs of the head (default 14)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "list":
        width = max(map(len, MODEL_NAMES))
        for name in MODEL_NAMES:
            params = count_parameters(build_model(name, args.num_labels))
            options = ", ".join(REGISTRY[name].options)
            print(f"{name:<{width}}  {params / 1e6:7.2f} M  {REGISTRY[name].description}  [options: {options}]")
    return 0


cli = cli_entry(main)  # the `cxr-models` console script

if __name__ == "__main__":
    raise SystemExit(cli())
